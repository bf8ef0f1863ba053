//! The added-latency chart: sequential p50 minus direct's (direct-tls's for the TLS
//! configurations) against payload size, one panel per upstream, log scale.

use std::fmt::Write as _;

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::model::{Row, fmt_size};
use crate::work::Upstream;

/// The chart of the run's first request encoding (identity when it ran).
pub fn svg(args: &Args, all: &[Row]) -> String {
    let enc = all.iter().map(|r| r.enc).min();
    let rows: Vec<&Row> = all.iter().filter(|r| Some(r.enc) == enc).collect();
    let (pw, ph, ml, mt, mb) = (420.0, 300.0, 60.0, 40.0, 50.0);
    let ups: Vec<Upstream> = [Upstream::Echo, Upstream::Temporal]
        .into_iter()
        .filter(|u| rows.iter().any(|r| r.upstream == *u))
        .collect();
    let width = ups.len() as f64 * (pw + ml + 20.0) + 10.0;
    let height = ph + mt + mb + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let sizes = &args.sizes;
    for (i, up) in ups.iter().enumerate() {
        let x0 = 10.0 + i as f64 * (pw + ml + 20.0) + ml;
        let y0 = mt;
        let added = |r: &Row| {
            let b = crate::model::base(all, r).expect("baseline row");
            (r.seq.p50() - b.seq.p50()).max(1.0)
        };
        let vals: Vec<f64> = rows
            .iter()
            .filter(|r| r.upstream == *up && r.cfg != r.cfg.baseline())
            .map(|r| added(r))
            .collect();
        let lo = 0.0f64; // log10(1 µs)
        let hi = vals.iter().fold(2.0f64, |m, v| m.max(v.log10().ceil()));
        let ypos = |v: f64| y0 + ph - (v.log10() - lo) / (hi - lo) * ph;
        let xpos = |k: usize| x0 + (k as f64 + 0.5) * pw / sizes.len() as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            x0 + pw / 2.0,
            y0 - 15.0,
            match up {
                Upstream::Echo => "Gateway alone (h2 echo upstream)",
                Upstream::Temporal => "Temporal dev server (RPC mix)",
            }
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        let mut d = lo as i32;
        while d as f64 <= hi {
            let v = 10f64.powi(d);
            let y = ypos(v);
            let label = if v >= 1000.0 {
                format!("{} ms", v / 1000.0)
            } else {
                format!("{v} µs")
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                x0 + pw,
                x0 - 5.0,
                y + 4.0
            );
            d += 1;
        }
        for (k, &size) in sizes.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                xpos(k),
                y0 + ph + 16.0,
                fmt_size(size)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">payload size</text>"#,
            x0 + pw / 2.0,
            y0 + ph + 34.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">added p50 latency vs direct (sequential, log)</text>"#,
            x0 - 48.0,
            y0 + ph / 2.0
        );
        let drawn = Cfg::ALL
            .into_iter()
            .filter(|c| *c != c.baseline())
            .filter(|c| rows.iter().any(|r| r.upstream == *up && r.cfg == *c));
        for (li, cfg) in drawn.enumerate() {
            let dash = if cfg.tls() {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let pts: Vec<(f64, f64)> = sizes
                .iter()
                .enumerate()
                .filter_map(|(k, &size)| {
                    rows.iter()
                        .find(|r| r.upstream == *up && r.cfg == cfg && r.size == size)
                        .map(|r| (xpos(k), ypos(added(r))))
                })
                .collect();
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                cfg.color()
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{}"/>"#,
                    cfg.color()
                );
            }
            let ly = y0 + 12.0 + li as f64 * 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                x0 + 8.0,
                x0 + 24.0,
                cfg.color(),
                x0 + 28.0,
                ly + 4.0,
                cfg.label()
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}" font-size="10">values ≤ 1 µs (or negative) are drawn at 1 µs; dashed: TLS on both hops, against direct-tls; data: load.csv</text>"#,
        height - 8.0
    );
    s.push_str("</svg>\n");
    s
}
