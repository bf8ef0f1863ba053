//! Error helpers shared by every layer (bottom of the module graph: imports nothing of the
//! crate).

/// Renders an error and its sources on one line: `client error (Connect): tcp connect error:
/// Connection refused (os error 111)`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
