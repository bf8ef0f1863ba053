//! Dependency direction between modules (issue 22 item 6): no top-level module of a workspace
//! crate imports a module that imports it back, and the declared layering rules hold.
//!
//! Run it (and print the graph, the cycles and every edge in them with file:line):
//!
//! ```text
//! cargo test -p payload-gateway --test architecture -- --nocapture
//! ```
//!
//! What it reads: every library and binary target of every workspace member (from the root
//! `Cargo.toml`), following `mod x;` declarations from the crate root like the compiler does
//! (`x.rs` or `x/mod.rs`; a `#[path]` attribute makes the check fail rather than guess).
//! Test code is left out: integration tests, benches and examples are other crates and are not
//! read; items and modules under `#[cfg(test)]` (or `#[cfg(all(test, …))]`) are skipped.
//! Every other `#[cfg]` counts (all features and platforms at once).
//!
//! What is an edge `a -> b` (a and b top-level modules of the same crate; the crate root's own
//! items are the node `(crate root)`): a module inside `a` names an item that is *defined*
//! inside `b`, through
//! - a `use` declaration (`crate::`, `self::`, `super::`, a child module's or an imported
//!   name; a use of an external crate is no edge),
//! - a path of two or more segments in code (`crate::b::f()`, `super::super::b::T`,
//!   `b::T` after `use crate::b;`), including paths in attributes' and macros' token streams
//!   that start with `crate`, `$crate`, `self` or `super`.
//!
//! `pub use` re-exports are followed to the module that defines the item: a use of
//! `crate::config::StorageConfig` re-exported from `config::storage` is an edge to `config`,
//! a use of `crate::codec::WirePayload` (`pub use crate::payload::Payload as WirePayload`) is an
//! edge to `payload`, not `codec`. Glob imports are followed too. What it does not see:
//! method calls on values whose type comes from elsewhere (no type inference), and names that
//! only macro expansion creates; both need an import somewhere, which is what it reads.
//!
//! [`KNOWN_CYCLE_EDGES`] and [`KNOWN_RULE_VIOLATIONS`] are empty: no workspace crate has a
//! circle between its modules, and every rule holds. The test fails on any
//! edge on a cycle that is not listed (a new circle, or a new edge into the existing one) and
//! on a listed edge that no longer is on a cycle (remove it from the list: the ratchet only
//! turns one way).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Edges on an import cycle, `(crate, from, to)`: empty since issue 22 item 6, and to stay
/// so. The list exists so that a refactoring in steps can name what it has not cut yet; never
/// add to it to make a new circle pass.
const KNOWN_CYCLE_EDGES: &[(&str, &str, &str)] = &[];

/// Declared layering rules, `(crate, module, must not depend on)`: no chain of imports, direct
/// or through other modules, leads from the first module to the second.
const RULES: &[(&str, &str, &str)] = &[
    ("payload-gateway", "config", "storage"),
    ("payload-gateway", "codec", "metrics"),
    ("payload-gateway", "kms", "upstream"),
];

/// Rules of [`RULES`] broken today: KNOWN FAILING, to be emptied by issue 22 item 6.
const KNOWN_RULE_VIOLATIONS: &[(&str, &str, &str)] = &[];

/// The node for the items of a crate's root file.
const ROOT: &str = "(crate root)";

// ---------------------------------------------------------------------------------------------
// Crates and module trees

/// One compilation target read from source: a library or a binary of a workspace member.
struct Crate {
    /// `package` for a library, `package (bin name)` for a binary.
    name: String,
    /// Modules by path from the crate root (`[]` is the root).
    modules: BTreeMap<Vec<String>, Module>,
}

/// One module: its items (test code removed) and the names they bind.
struct Module {
    file: PathBuf,
    items: Vec<syn::Item>,
    /// Names bound in this module: child modules, items, imports.
    names: HashMap<String, Vec<Binding>>,
    /// Sources of `use …::*` in this module (absolute paths, `None` when external).
    globs: Vec<Option<Vec<String>>>,
}

#[derive(Clone, Debug)]
enum Binding {
    /// `mod name` (its path from the crate root).
    Module(Vec<String>),
    /// An item defined here.
    Item,
    /// `use path as name`: the absolute path in this crate, `None` for another crate.
    Import(Option<Vec<String>>),
}

/// Library and binary targets of every workspace member: `(crate name, root file)`.
fn workspace_targets(root: &Path) -> Vec<(String, PathBuf)> {
    let manifest: toml::Table = read(&root.join("Cargo.toml"))
        .parse()
        .expect("workspace Cargo.toml");
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members");
    let mut targets = Vec::new();
    for member in members {
        let dir = root.join(member.as_str().expect("member path"));
        let package: toml::Table = read(&dir.join("Cargo.toml"))
            .parse()
            .expect("member Cargo.toml");
        let name = package["package"]["name"]
            .as_str()
            .expect("package.name")
            .to_string();
        let lib = package
            .get("lib")
            .and_then(|l| l.get("path"))
            .and_then(|p| p.as_str())
            .map(|p| dir.join(p))
            .unwrap_or_else(|| dir.join("src/lib.rs"));
        if lib.exists() {
            targets.push((name.clone(), lib));
        }
        let mut bins: Vec<(String, PathBuf)> = Vec::new();
        for bin in package
            .get("bin")
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            let bin_name = bin["name"].as_str().expect("bin.name").to_string();
            let path = bin
                .get("path")
                .and_then(|p| p.as_str())
                .map(|p| dir.join(p))
                .unwrap_or_else(|| dir.join(format!("src/bin/{bin_name}.rs")));
            bins.push((bin_name, path));
        }
        let main = dir.join("src/main.rs");
        if main.exists() && !bins.iter().any(|(_, p)| *p == main) {
            bins.push((name.clone(), main));
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("src/bin")) {
            let mut auto: Vec<PathBuf> =
                entries.map(|e| e.expect("src/bin entry").path()).collect();
            auto.sort();
            for path in auto {
                let file = if path.is_dir() {
                    path.join("main.rs")
                } else {
                    path.clone()
                };
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                if file.extension().is_some_and(|e| e == "rs")
                    && !bins.iter().any(|(_, p)| *p == file)
                {
                    bins.push((stem, file));
                }
            }
        }
        for (bin_name, path) in bins {
            targets.push((format!("{name} (bin {bin_name})"), path));
        }
    }
    targets
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_file(path: &Path) -> syn::File {
    syn::parse_file(&read(path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// True when `attrs` compile the item for tests only: `#[cfg(test)]`, `#[cfg(all(.., test, ..))]`.
fn test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        if !attr.path().is_ident("cfg") {
            return false;
        }
        let Ok(meta) = attr.parse_args::<syn::Meta>() else {
            return false;
        };
        requires_test(&meta)
    })
}

fn requires_test(meta: &syn::Meta) -> bool {
    match meta {
        syn::Meta::Path(p) => p.is_ident("test"),
        syn::Meta::List(list) if list.path.is_ident("all") => list
            .parse_args_with(
                syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
            )
            .is_ok_and(|inner| inner.iter().any(requires_test)),
        _ => false,
    }
}

fn attrs_of(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::ExternCrate(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::ForeignMod(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::TraitAlias(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Reads the module tree of the crate whose root file is `root_file`.
fn load_crate(name: &str, root_file: &Path) -> Crate {
    let mut modules = BTreeMap::new();
    let file = parse_file(root_file);
    let dir = root_file.parent().expect("root dir").to_path_buf();
    load_module(&mut modules, Vec::new(), root_file, dir, file.items);
    let mut krate = Crate {
        name: name.to_string(),
        modules,
    };
    bind_names(&mut krate);
    krate
}

/// Adds the module at `path` (items `items`, from `file`, its `mod x;` files in `dir`) and its
/// descendants.
fn load_module(
    modules: &mut BTreeMap<Vec<String>, Module>,
    path: Vec<String>,
    file: &Path,
    dir: PathBuf,
    items: Vec<syn::Item>,
) {
    let items: Vec<syn::Item> = items
        .into_iter()
        .filter(|i| !test_only(attrs_of(i)))
        .collect();
    let mut kept = Vec::new();
    for item in items {
        let syn::Item::Mod(m) = &item else {
            kept.push(item);
            continue;
        };
        assert!(
            !m.attrs.iter().any(|a| a.path().is_ident("path")),
            "{}: `#[path]` on `mod {}`: teach tests/architecture.rs to follow it",
            file.display(),
            m.ident
        );
        let mut child = path.clone();
        child.push(m.ident.to_string());
        match &m.content {
            Some((_, inner)) => {
                load_module(
                    modules,
                    child,
                    file,
                    dir.join(m.ident.to_string()),
                    inner.clone(),
                );
            }
            None => {
                let flat = dir.join(format!("{}.rs", m.ident));
                let nested = dir.join(m.ident.to_string()).join("mod.rs");
                let (child_file, child_dir) = if flat.exists() {
                    (flat, dir.join(m.ident.to_string()))
                } else if nested.exists() {
                    (nested, dir.join(m.ident.to_string()))
                } else {
                    panic!(
                        "{}: no file for `mod {}` in {}",
                        file.display(),
                        m.ident,
                        dir.display()
                    )
                };
                let parsed = parse_file(&child_file);
                load_module(modules, child, &child_file, child_dir, parsed.items);
            }
        }
        // Keep the declaration (without its body) so the parent binds the name.
        let mut decl = m.clone();
        decl.content = None;
        kept.push(syn::Item::Mod(decl));
    }
    modules.insert(
        path,
        Module {
            file: file.to_path_buf(),
            items: kept,
            names: HashMap::new(),
            globs: Vec::new(),
        },
    );
}

/// One leaf of a `use` tree: the path as written and the name it binds (`None` for a glob).
struct UseLeaf {
    path: Vec<String>,
    leading_colon: bool,
    name: Option<String>,
}

fn flatten_use(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    leading_colon: bool,
    out: &mut Vec<UseLeaf>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, leading_colon, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let ident = n.ident.to_string();
            if ident == "self" {
                let name = prefix.last().cloned();
                out.push(UseLeaf {
                    path: prefix.clone(),
                    leading_colon,
                    name,
                });
            } else {
                let mut path = prefix.clone();
                path.push(ident.clone());
                out.push(UseLeaf {
                    path,
                    leading_colon,
                    name: Some(ident),
                });
            }
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            let ident = r.ident.to_string();
            if ident != "self" {
                path.push(ident);
            }
            out.push(UseLeaf {
                path,
                leading_colon,
                name: Some(r.rename.to_string()),
            });
        }
        syn::UseTree::Glob(_) => out.push(UseLeaf {
            path: prefix.clone(),
            leading_colon,
            name: None,
        }),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, leading_colon, out);
            }
        }
    }
}

fn item_name(item: &syn::Item) -> Option<String> {
    let ident = match item {
        syn::Item::Const(i) => &i.ident,
        syn::Item::Enum(i) => &i.ident,
        syn::Item::ExternCrate(i) => {
            return Some(i.rename.as_ref().map_or(&i.ident, |r| &r.1).to_string());
        }
        syn::Item::Fn(i) => &i.sig.ident,
        syn::Item::Macro(i) => i.ident.as_ref()?,
        syn::Item::Static(i) => &i.ident,
        syn::Item::Struct(i) => &i.ident,
        syn::Item::Trait(i) => &i.ident,
        syn::Item::TraitAlias(i) => &i.ident,
        syn::Item::Type(i) => &i.ident,
        syn::Item::Union(i) => &i.ident,
        _ => return None,
    };
    Some(ident.to_string())
}

/// Fills every module's `names` and `globs`. Imports are made absolute against the names the
/// module itself defines (child modules and items first, as the compiler's uniform paths).
fn bind_names(krate: &mut Crate) {
    let paths: Vec<Vec<String>> = krate.modules.keys().cloned().collect();
    // Pass 1: modules and items.
    for path in &paths {
        let module = krate.modules.get_mut(path).expect("module");
        let mut names: HashMap<String, Vec<Binding>> = HashMap::new();
        for item in &module.items {
            match item {
                syn::Item::Mod(m) => {
                    let mut child = path.clone();
                    child.push(m.ident.to_string());
                    names
                        .entry(m.ident.to_string())
                        .or_default()
                        .push(Binding::Module(child));
                }
                other => {
                    if let Some(name) = item_name(other) {
                        names.entry(name).or_default().push(Binding::Item);
                    }
                }
            }
        }
        module.names = names;
    }
    // Pass 2: imports, absolute against pass 1 (and, for a first segment bound by another
    // import of the same module, against that import).
    for path in &paths {
        let module = &krate.modules[path];
        let mut leaves = Vec::new();
        for item in &module.items {
            if let syn::Item::Use(u) = item {
                flatten_use(
                    &u.tree,
                    &mut Vec::new(),
                    u.leading_colon.is_some(),
                    &mut leaves,
                );
            }
        }
        let mut imports = Vec::new();
        let mut globs = Vec::new();
        for leaf in &leaves {
            let target = absolute(krate, path, &leaf.path, leaf.leading_colon, &leaves);
            match &leaf.name {
                Some(name) => imports.push((name.clone(), target)),
                None => globs.push(target),
            }
        }
        let module = krate.modules.get_mut(path).expect("module");
        for (name, target) in imports {
            module
                .names
                .entry(name)
                .or_default()
                .push(Binding::Import(target));
        }
        module.globs = globs;
    }
}

/// The absolute path (from the crate root) of `written`, as written in module `at`; `None`
/// when it names another crate.
fn absolute(
    krate: &Crate,
    at: &[String],
    written: &[String],
    leading_colon: bool,
    sibling_uses: &[UseLeaf],
) -> Option<Vec<String>> {
    if leading_colon || written.is_empty() {
        return None;
    }
    let mut base: Vec<String>;
    let mut rest = written;
    match written[0].as_str() {
        "crate" | "$crate" => {
            base = Vec::new();
            rest = &written[1..];
        }
        "self" => {
            base = at.to_vec();
            rest = &written[1..];
        }
        "super" => {
            base = at.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        first => {
            let module = &krate.modules[at];
            let bindings = module
                .names
                .get(first)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if bindings
                .iter()
                .any(|b| matches!(b, Binding::Module(_) | Binding::Item))
            {
                base = at.to_vec();
            } else if let Some(leaf) = sibling_uses
                .iter()
                .find(|l| l.name.as_deref() == Some(first) && l.path != written)
            {
                // `use crate::codec; use codec::Foo;`: through the other import (while binding).
                let mut joined = leaf.path.clone();
                joined.extend_from_slice(&written[1..]);
                return absolute(krate, at, &joined, leaf.leading_colon, &[]);
            } else if let Some(target) = bindings.iter().find_map(|b| match b {
                Binding::Import(t) => Some(t.clone()),
                _ => None,
            }) {
                // The same, once the module's imports are bound; `None`: another crate's name.
                base = target?;
                rest = &written[1..];
            } else {
                return None; // an external crate
            }
        }
    }
    base.extend_from_slice(rest);
    Some(base)
}

/// Where a resolved path's item is defined: its module path, or `None` for another crate.
fn resolve(krate: &Crate, path: &[String], depth: usize) -> Option<Vec<String>> {
    if depth > 32 {
        return None; // an import loop; the compiler would refuse it
    }
    let mut current: Vec<String> = Vec::new();
    for (i, segment) in path.iter().enumerate() {
        let module = &krate.modules[&current];
        let last = i + 1 == path.len();
        let bindings = module.names.get(segment.as_str());
        let child = bindings.and_then(|b| {
            b.iter().find_map(|b| match b {
                Binding::Module(p) => Some(p.clone()),
                _ => None,
            })
        });
        let item = bindings.is_some_and(|b| b.iter().any(|b| matches!(b, Binding::Item)));
        let import = bindings.and_then(|b| {
            b.iter().find_map(|b| match b {
                Binding::Import(t) => Some(t.clone()),
                _ => None,
            })
        });
        if let Some(child) = child.filter(|_| !last || !item) {
            current = child;
            continue;
        }
        if item {
            return Some(current);
        }
        if let Some(target) = import {
            let mut joined = target?;
            joined.extend_from_slice(&path[i + 1..]);
            return resolve(krate, &joined, depth + 1);
        }
        for glob in &module.globs {
            let Some(source) = glob else { continue };
            let mut joined = source.clone();
            joined.extend_from_slice(&path[i..]);
            if let Some(found) = resolve_strict(krate, &joined, depth + 1) {
                return Some(found);
            }
        }
        // A name this reader cannot see (macro-made, enum variant of a glob...): the module
        // that was reached owns it.
        return Some(current);
    }
    Some(current)
}

/// [`resolve`], but only when the name after the last module is bound there.
fn resolve_strict(krate: &Crate, path: &[String], depth: usize) -> Option<Vec<String>> {
    let (last, parent) = path.split_last()?;
    let owner_of_parent = resolve(krate, parent, depth)?;
    let module = krate.modules.get(&owner_of_parent)?;
    module
        .names
        .contains_key(last.as_str())
        .then(|| resolve(krate, path, depth))
        .flatten()
}

// ---------------------------------------------------------------------------------------------
// Edges

/// Where an edge was seen: file, line, and the path as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: String,
    line: usize,
    written: String,
}

/// `(from, to) -> sites`, top-level modules of one crate.
type Edges = BTreeMap<(String, String), BTreeSet<Site>>;

fn top(path: &[String]) -> String {
    path.first().cloned().unwrap_or_else(|| ROOT.to_string())
}

struct Collector<'a> {
    krate: &'a Crate,
    at: Vec<String>,
    file: String,
    edges: &'a mut Edges,
}

impl Collector<'_> {
    /// Records an edge to the owner of `path` (as written in the current module), if that is
    /// another top-level module of this crate.
    fn record(&mut self, path: &[String], leading_colon: bool, line: usize, written: String) {
        let Some(abs) = absolute(self.krate, &self.at, path, leading_colon, &[]) else {
            return;
        };
        let Some(owner) = resolve(self.krate, &abs, 0) else {
            return;
        };
        let (from, to) = (top(&self.at), top(&owner));
        if from != to {
            let site = Site {
                file: self.file.clone(),
                line,
                written,
            };
            self.edges.entry((from, to)).or_default().insert(site);
        }
    }

    /// `crate::…`, `$crate::…`, `self::…`, `super::…` paths in a token stream (macro bodies,
    /// attribute arguments).
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            if let TokenTree::Group(g) = &tokens[i] {
                self.scan_tokens(g.stream());
                i += 1;
                continue;
            }
            let TokenTree::Ident(ident) = &tokens[i] else {
                i += 1;
                continue;
            };
            let first = ident.to_string();
            let dollar =
                i > 0 && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '$');
            let preceded_by_path = i >= 2
                && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == ':')
                && matches!(&tokens[i - 2], TokenTree::Punct(p) if p.as_char() == ':');
            if !matches!(first.as_str(), "crate" | "self" | "super") || preceded_by_path {
                i += 1;
                continue;
            }
            let line = ident.span().start().line;
            let mut path = vec![if dollar { "$crate".to_string() } else { first }];
            let mut j = i + 1;
            while j + 2 < tokens.len() + 1 {
                let colons = matches!(tokens.get(j), Some(TokenTree::Punct(p)) if p.as_char() == ':')
                    && matches!(tokens.get(j + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':');
                match (colons, tokens.get(j + 2)) {
                    (true, Some(TokenTree::Ident(next))) => {
                        path.push(next.to_string());
                        j += 3;
                    }
                    _ => break,
                }
            }
            if path.len() >= 2 {
                let written = path.join("::");
                self.record(&path, false, line, written);
            }
            i = j;
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if test_only(attrs_of(item)) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {
        // Modules are read as modules of their own (block-level `mod` has no content here).
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => return syn::visit::visit_impl_item(self, item),
        };
        if !test_only(attrs) {
            syn::visit::visit_impl_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if test_only(&item.attrs) {
            return;
        }
        let mut leaves = Vec::new();
        flatten_use(
            &item.tree,
            &mut Vec::new(),
            item.leading_colon.is_some(),
            &mut leaves,
        );
        let line = item.use_token.span.start().line;
        for leaf in leaves {
            // `use crate::codec;` alone is no edge: the paths through it (`codec::Foo`) are.
            let names_module = leaf.name.is_some()
                && absolute(self.krate, &self.at, &leaf.path, leaf.leading_colon, &[])
                    .is_some_and(|abs| self.krate.modules.contains_key(&abs));
            if names_module {
                continue;
            }
            let mut written = leaf.path.join("::");
            if leaf.name.is_none() {
                written.push_str("::*");
            }
            self.record(&leaf.path, leaf.leading_colon, line, written);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let first = segments.first().map(String::as_str).unwrap_or_default();
        let anchored = matches!(first, "crate" | "self" | "super");
        // `codec::Foo` after `use crate::codec;`, or a child module's item. A path through an
        // imported item (`ConfigError::invalid`) adds no edge its `use` has not.
        let here = &self.krate.modules[&self.at];
        let bound_here = here.names.get(first).is_some_and(|b| {
            b.iter().any(|b| match b {
                Binding::Module(_) => true,
                Binding::Import(Some(target)) => self.krate.modules.contains_key(target),
                _ => false,
            })
        });
        if segments.len() >= 2 && path.leading_colon.is_none() && (anchored || bound_here) {
            let line = path.segments[0].ident.span().start().line;
            let written = segments.join("::");
            self.record(&segments, false, line, written);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.scan_tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        if let syn::Meta::List(list) = &attr.meta {
            self.scan_tokens(list.tokens.clone());
        }
    }
}

/// Every edge between top-level modules of `krate`.
fn edges_of(krate: &Crate, workspace: &Path) -> Edges {
    let mut edges = Edges::new();
    for (path, module) in &krate.modules {
        let file = module
            .file
            .strip_prefix(workspace)
            .unwrap_or(&module.file)
            .display()
            .to_string();
        let mut collector = Collector {
            krate,
            at: path.clone(),
            file,
            edges: &mut edges,
        };
        for item in &module.items {
            collector.visit_item(item);
        }
    }
    edges
}

// ---------------------------------------------------------------------------------------------
// Graph

/// Strongly connected components with more than one module (Tarjan).
fn cycles(nodes: &BTreeSet<String>, edges: &Edges) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        adjacency: BTreeMap<&'a str, Vec<&'a str>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.adjacency.get(v).cloned().unwrap_or_default() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            loop {
                let w = s.stack.pop().expect("stack");
                s.on_stack.remove(w);
                component.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut adjacency: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        adjacency
            .entry(from.as_str())
            .or_default()
            .push(to.as_str());
    }
    let mut state = State {
        adjacency,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for node in nodes {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node.as_str());
        }
    }
    state.out
}

/// A shortest chain of edges from `from` to `to`, both included.
fn shortest_path(edges: &Edges, from: &str, to: &str) -> Option<Vec<String>> {
    let mut previous: HashMap<&str, &str> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = BTreeSet::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut path = vec![to.to_string()];
            let mut at = to;
            while at != from {
                at = previous[at];
                path.push(at.to_string());
            }
            path.reverse();
            return Some(path);
        }
        for ((a, b), _) in edges.range((v.to_string(), String::new())..) {
            if a != v {
                break;
            }
            if seen.insert(b.as_str()) {
                previous.insert(b.as_str(), v);
                queue.push_back(b.as_str());
            }
        }
    }
    None
}

/// The fewest edges of `component` whose removal leaves it without a cycle (ties: the fewest
/// places to change), by dynamic programming over orderings of its modules (exact; components of
/// up to 20 modules).
fn smallest_cut(edges: &Edges, component: &BTreeSet<String>) -> Option<Vec<(String, String)>> {
    let nodes: Vec<&String> = component.iter().collect();
    let n = nodes.len();
    if n > 20 {
        return None;
    }
    let weight = |a: usize, b: usize| -> u64 {
        edges
            .get(&(nodes[a].clone(), nodes[b].clone()))
            .map_or(0, |sites| 1_000_000 + sites.len() as u64)
    };
    // best[set] = (cost, last): the cheapest ordering of `set` putting `last` at its end; the
    // edges cut are those from a module to one placed before it.
    let mut best: Vec<(u64, usize)> = vec![(u64::MAX, 0); 1 << n];
    best[0] = (0, 0);
    for set in 1usize..(1 << n) {
        for v in (0..n).filter(|v| set & (1 << v) != 0) {
            let before = set & !(1 << v);
            let cost = best[before].0
                + (0..n)
                    .filter(|u| before & (1 << u) != 0)
                    .map(|u| weight(v, u))
                    .sum::<u64>();
            if cost < best[set].0 {
                best[set] = (cost, v);
            }
        }
    }
    let mut order = Vec::new();
    let mut set = (1usize << n) - 1;
    while set != 0 {
        let v = best[set].1;
        order.push(v);
        set &= !(1 << v);
    }
    order.reverse();
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut cut = Vec::new();
    for a in 0..n {
        for b in 0..n {
            if weight(a, b) > 0 && position[&b] < position[&a] {
                cut.push((nodes[a].clone(), nodes[b].clone()));
            }
        }
    }
    Some(cut)
}

/// The graph of one crate, analysed.
struct Report {
    krate: String,
    nodes: BTreeSet<String>,
    edges: Edges,
    components: Vec<BTreeSet<String>>,
}

impl Report {
    fn new(krate: &Crate, workspace: &Path) -> Report {
        let edges = edges_of(krate, workspace);
        let mut nodes: BTreeSet<String> = krate.modules.keys().map(|p| top(p)).collect();
        for (a, b) in edges.keys() {
            nodes.insert(a.clone());
            nodes.insert(b.clone());
        }
        let components = cycles(&nodes, &edges);
        Report {
            krate: krate.name.clone(),
            nodes,
            edges,
            components,
        }
    }

    /// Edges whose two ends are in one cycle.
    fn cycle_edges(&self) -> BTreeSet<(String, String)> {
        self.edges
            .keys()
            .filter(|(a, b)| {
                self.components
                    .iter()
                    .any(|c| c.contains(a) && c.contains(b))
            })
            .cloned()
            .collect()
    }

    fn print(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "== {}: {} modules, {} edges",
            self.krate,
            self.nodes.len(),
            self.edges.len()
        );
        for node in &self.nodes {
            let targets: Vec<&str> = self
                .edges
                .keys()
                .filter(|(a, _)| a == node)
                .map(|(_, b)| b.as_str())
                .collect();
            let _ = writeln!(out, "   {node} -> {}", targets.join(", "));
        }
        for (n, component) in self.components.iter().enumerate() {
            let names: Vec<&str> = component.iter().map(String::as_str).collect();
            let inside: Vec<_> = self
                .cycle_edges()
                .into_iter()
                .filter(|(a, _)| component.contains(a))
                .collect();
            let _ = writeln!(
                out,
                "-- cycle {} of {}: {} modules, {} edges: {}",
                n + 1,
                self.krate,
                names.len(),
                inside.len(),
                names.join(", ")
            );
            if let Some(cut) = smallest_cut(&self.edges, component) {
                let names: Vec<String> = cut
                    .iter()
                    .map(|(a, b)| {
                        format!("{a} -> {b} ({})", self.edges[&(a.clone(), b.clone())].len())
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "   fewest edges to cut for no cycle here ({}, places in brackets): {}",
                    cut.len(),
                    names.join(", ")
                );
            }
            for (a, b) in &inside {
                let back = shortest_path(&self.edges, b, a).expect("in one component");
                let _ = writeln!(out, "   {a} -> {b}   (closes {a} -> {})", back.join(" -> "));
                let mut lines: BTreeMap<(&str, usize), Vec<&str>> = BTreeMap::new();
                for site in &self.edges[&(a.clone(), b.clone())] {
                    lines
                        .entry((&site.file, site.line))
                        .or_default()
                        .push(&site.written);
                }
                for ((file, line), written) in lines {
                    let _ = writeln!(out, "      {file}:{line}  {}", written.join(", "));
                }
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn reports(workspace: &Path) -> Vec<Report> {
    workspace_targets(workspace)
        .into_iter()
        .map(|(name, file)| Report::new(&load_crate(&name, &file), workspace))
        .collect()
}

#[test]
fn no_import_cycles_between_modules_and_the_layering_rules_hold() {
    let workspace = workspace_root();
    let reports = reports(&workspace);
    let mut out = String::new();
    for report in &reports {
        report.print(&mut out);
    }
    println!("{out}");

    let mut problems = Vec::new();
    let mut known: BTreeSet<(String, String, String)> = KNOWN_CYCLE_EDGES
        .iter()
        .map(|&(k, a, b)| (k.to_string(), a.to_string(), b.to_string()))
        .collect();
    for report in &reports {
        for (a, b) in report.cycle_edges() {
            if !known.remove(&(report.krate.clone(), a.clone(), b.clone())) {
                let back = shortest_path(&report.edges, &b, &a).expect("cycle");
                let sites = &report.edges[&(a.clone(), b.clone())];
                let first = sites.iter().next().expect("an edge has a site");
                problems.push(format!(
                    "{}: `{a}` imports `{b}` ({} places, first {}:{} `{}`) and `{b}` leads back: {a} -> {}",
                    report.krate,
                    sites.len(),
                    first.file,
                    first.line,
                    first.written,
                    back.join(" -> ")
                ));
            }
        }
    }
    for (krate, a, b) in known {
        problems.push(format!(
            "{krate}: the edge {a} -> {b} is no longer on a cycle: remove it from KNOWN_CYCLE_EDGES"
        ));
    }

    let mut known_rules: BTreeSet<(&str, &str, &str)> =
        KNOWN_RULE_VIOLATIONS.iter().copied().collect();
    for &(krate, from, to) in RULES {
        let report = reports
            .iter()
            .find(|r| r.krate == krate)
            .unwrap_or_else(|| {
                panic!("rule names crate `{krate}`, which is not a workspace library")
            });
        for module in [from, to] {
            assert!(
                report.nodes.contains(module),
                "rule names `{krate}::{module}`, which does not exist"
            );
        }
        match shortest_path(&report.edges, from, to) {
            Some(chain) if !known_rules.remove(&(krate, from, to)) => {
                let first = &report.edges[&(chain[0].clone(), chain[1].clone())];
                let site = first
                    .iter()
                    .next()
                    .map(|s| format!("{}:{}", s.file, s.line))
                    .unwrap_or_default();
                problems.push(format!(
                    "{krate}: `{from}` must not depend on `{to}`, but {} (first step at {site})",
                    chain.join(" -> ")
                ));
            }
            Some(_) => {}
            None => {
                if known_rules.remove(&(krate, from, to)) {
                    problems.push(format!(
                        "{krate}: `{from}` no longer depends on `{to}`: remove it from KNOWN_RULE_VIOLATIONS"
                    ));
                }
            }
        }
    }
    for (krate, from, to) in known_rules {
        problems.push(format!(
            "{krate}: KNOWN_RULE_VIOLATIONS lists ({from}, {to}), which is not in RULES"
        ));
    }
    assert!(
        problems.is_empty(),
        "dependency direction broken:\n{}\n\n{out}",
        problems.join("\n")
    );
}

/// The reader itself, on a crate written here: `super::`, code paths, `use` groups with `self`,
/// re-exports (in a module and at the root), `$crate` in a macro, and test-only code skipped.
#[test]
fn the_checker_sees_each_kind_of_import_and_skips_test_code() {
    let dir = tempfile::tempdir().unwrap();
    let files: &[(&str, &str)] = &[
        (
            "lib.rs",
            "pub mod a; pub mod b; pub mod c; pub mod d; pub mod e; pub mod f;\n\
             pub use e::Facade;\n\
             #[cfg(test)] mod tests { use crate::f::F; }\n",
        ),
        ("a.rs", "pub struct A;\npub mod inner;\n"),
        // a -> b through `super::super`
        ("a/inner.rs", "use super::super::b::B;\npub fn f(_: B) {}\n"),
        // b -> a through a path in code
        (
            "b.rs",
            "pub struct B;\npub fn g() { crate::a::inner::f(B) }\n",
        ),
        // c re-exports d's item (c -> d); `$crate` in a macro body (c -> a)
        (
            "c.rs",
            "pub use crate::d::D as Renamed;\n\
             #[macro_export] macro_rules! m { () => { $crate::a::A } }\n",
        ),
        // d -> e through the root's re-export; test-only code names f and b: no edge
        (
            "d.rs",
            "pub struct D;\npub fn uses() -> crate::Facade { crate::Facade }\n\
             #[cfg(test)] mod tests { use crate::f::F; }\n\
             #[cfg(all(test, unix))] fn t() { crate::b::g() }\n",
        ),
        // e -> d through c's re-export (not e -> c); a `use` group with `self`
        (
            "e.rs",
            "use crate::{c::{self}, f::{self as eff}};\npub struct Facade;\n\
             pub fn h(_: c::Renamed) {}\npub fn i(_: eff::F) {}\n",
        ),
        (
            "f.rs",
            "pub struct F;\nimpl F { #[cfg(test)] fn t() { crate::a::inner::f(crate::b::B) } }\n",
        ),
    ];
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let krate = load_crate("synthetic", &dir.path().join("lib.rs"));
    let report = Report::new(&krate, dir.path());
    let edges: BTreeSet<(&str, &str)> = report
        .edges
        .keys()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let expected = BTreeSet::from([
        ("(crate root)", "e"),
        ("a", "b"),
        ("b", "a"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("e", "f"),
    ]);
    assert_eq!(edges, expected);
    let components: Vec<Vec<&str>> = report
        .components
        .iter()
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(components.len(), 2, "{components:?}");
    assert!(
        components.contains(&vec!["a", "b"]) && components.contains(&vec!["d", "e"]),
        "{components:?}"
    );
    let site = report.edges[&("a".to_string(), "b".to_string())]
        .iter()
        .next()
        .unwrap()
        .clone();
    assert_eq!((site.file.as_str(), site.line), ("a/inner.rs", 1));
    assert_eq!(
        shortest_path(&report.edges, "c", "e").unwrap(),
        ["c", "d", "e"]
    );
    assert!(shortest_path(&report.edges, "f", "a").is_none());
    let cut = smallest_cut(&report.edges, &report.components[0]).unwrap();
    assert_eq!(cut.len(), 1, "{cut:?}");
}
