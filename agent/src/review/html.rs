//! The report as one self-contained HTML file: the same sections and figures as the Markdown
//! form (`super::render`'s rows), inline CSS, no script, nothing fetched.
//!
//! Every value in the report can be hostile text (an identity is what a token or a Unix
//! account name said, a statement is what a client sent), so every value goes through
//! `escape` and only ever lands in element content or a quoted attribute. The page's own
//! Content-Security-Policy forbids scripts and every fetch, so a value that got through
//! anyway could still neither run nor call out.

use std::fmt::Write as _;

use super::render::{
    chain_range, evidence_text, production_preamble, rows, title, ChainRange, ReportSignature, Row,
    Section, SECTIONS,
};
use super::report::Report;

/// Where the signature part of an HTML report starts: the signed body is every byte before
/// it. Escaped values cannot hold a `<`, so only the renderer can write this.
pub const HTML_SIGNATURE_START: &str = "<section id=\"signature\"";

/// Dark text on white and white on dark red: contrast well above WCAG AA's 4.5:1.
const STYLE: &str = "\
body{font-family:system-ui,sans-serif;color:#1a1a1a;background:#fff;margin:2rem;line-height:1.4}\
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #767676}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{border:1px solid #767676;padding:.3rem .5rem;text-align:left;vertical-align:top}\
th{background:#e8e8e8}td{overflow-wrap:anywhere}\
.evidence{font-family:ui-monospace,monospace}\
.unverified{background:#8b0000;color:#fff;padding:1rem;font-size:1.2rem;font-weight:bold}\
.verified{color:#0b5d1e;font-weight:bold}.broken{color:#8b0000;font-weight:bold}\
dt{font-weight:bold}dd{margin:0 0 .5rem 1.5rem}a{color:#0645ad}\
";

/// Characters that reorder or hide the text around them (Unicode bidi controls): shown as
/// their code points, so a value cannot make a report read differently from what it holds.
pub(super) fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Text for element content and quoted attributes: the five HTML metacharacters as
/// references, control and bidi characters as visible `[U+XXXX]`, line breaks kept.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\r' | '\t' => out.push(c),
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "[U+{:04X}]", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn seal(out: &mut String, chain: &ChainRange) {
    out.push_str(
        "<section id=\"seal\" aria-labelledby=\"seal-title\">\n\
         <h2 id=\"seal-title\">Seal: the trail this report was computed from</h2>\n<dl>\n",
    );
    let _ = writeln!(
        out,
        "<dt>Chain read</dt><dd>{}</dd>",
        escape(&chain_range(chain))
    );
    let verdict = match &chain.broken {
        Some(b) => format!(
            "<dd class=\"broken\">UNVERIFIED: the chain is BROKEN: {}</dd>",
            escape(b)
        ),
        None if chain.seals_signature_checked => {
            "<dd class=\"verified\">verified intact, seals signed</dd>".to_string()
        }
        None => "<dd class=\"verified\">verified intact</dd>".to_string(),
    };
    let _ = writeln!(out, "<dt>Verification</dt>{verdict}");
    if let Some(h) = &chain.head_hash {
        let _ = writeln!(
            out,
            "<dt>Last record's hash (the signature binds the report to it)</dt><dd><code>{}</code></dd>",
            escape(h)
        );
    }
    let _ = writeln!(
        out,
        "<dt>Signature</dt><dd>{}</dd>\n</dl>\n</section>",
        if chain.verified {
            "<a href=\"#signature\">at the end</a>, over every byte before it"
        } else {
            "none: the chain did not verify"
        }
    );
}

fn table(out: &mut String, key: &str, rows: &[&Row]) {
    out.push_str(
        "<table>\n<thead><tr><th scope=\"col\">Identity</th><th scope=\"col\">Target</th>\
         <th scope=\"col\">What</th><th scope=\"col\">Count</th><th scope=\"col\">Detail</th>\
         <th scope=\"col\">Evidence (seq)</th></tr></thead>\n<tbody>\n",
    );
    for (n, r) in rows.iter().enumerate() {
        // A figure's own anchor, so a finding can be cited by link.
        let _ = writeln!(
            out,
            "<tr id=\"{key}-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"evidence\">{}</td></tr>",
            n.saturating_add(1),
            escape(&r.identity),
            escape(&r.target),
            escape(&r.item),
            escape(&r.count),
            escape(&r.detail),
            escape(&evidence_text(&r.evidence))
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

/// The signed part: everything up to `HTML_SIGNATURE_START`, left open (`<main>`,
/// `<body>`, `<html>`) for the signature part to close.
pub fn html_body(report: &Report, chain: &ChainRange) -> String {
    let heading = escape(&title(report));
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{heading}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <h1>{heading}</h1>\n"
    );
    if !chain.verified {
        out.push_str(
            "<p class=\"unverified\" role=\"alert\">UNVERIFIED: computed from a chain that \
             does not verify; not signed.</p>\n",
        );
    }
    seal(&mut out, chain);
    let _ = writeln!(out, "<p>Events in the period: {}</p>", report.events);
    for note in &report.notes {
        let _ = writeln!(out, "<p>Note: {}</p>", escape(note));
    }
    let all = rows(report);
    out.push_str(
        "<nav aria-labelledby=\"contents-title\">\n<h2 id=\"contents-title\">Contents</h2>\n<ol>\n",
    );
    for Section { key, title, .. } in &SECTIONS {
        let n = all.iter().filter(|r| r.section == *key).count();
        let _ = writeln!(
            out,
            "<li><a href=\"#{key}\">{}</a> ({n})</li>",
            escape(title)
        );
    }
    out.push_str("</ol>\n</nav>\n");
    for Section { key, title, caveat } in SECTIONS {
        let _ = writeln!(
            out,
            "<section id=\"{key}\" aria-labelledby=\"{key}-title\">\n<h2 id=\"{key}-title\">{}</h2>",
            escape(title)
        );
        if key == "production_reach" {
            let _ = writeln!(out, "<p>{}</p>", escape(&production_preamble(report)));
        }
        if let Some(caveat) = caveat {
            let _ = writeln!(out, "<p>{}</p>", escape(caveat));
        }
        let section: Vec<&Row> = all.iter().filter(|r| r.section == key).collect();
        if section.is_empty() {
            out.push_str("<p>None.</p>\n");
        } else {
            table(&mut out, key, &section);
        }
        out.push_str("</section>\n");
    }
    out
}

/// The signature part, which closes the document the body opened.
pub fn html_signature(signature: Option<&ReportSignature>) -> String {
    let mut out = format!(
        "{HTML_SIGNATURE_START} aria-labelledby=\"signature-title\">\n\
         <h2 id=\"signature-title\">Signature</h2>\n"
    );
    match signature {
        Some(s) => {
            let _ = writeln!(
                out,
                "<dl>\n<dt>Method</dt><dd>{}</dd>\n\
                 <dt>SHA-256 of the signed message</dt><dd><code>{}</code></dd>",
                match s.method {
                    "ed25519" => "Ed25519, the audit signing key (audit.signing_key_file)",
                    _ => "SHA-256 digest only (no audit.signing_key_file configured)",
                },
                escape(&s.digest)
            );
            if let (Some(sig), Some(key)) = (&s.signature, &s.public_key) {
                let _ = writeln!(
                    out,
                    "<dt>Signature</dt><dd><code>{}</code></dd>\n\
                     <dt>Public key</dt><dd><code>{}</code></dd>",
                    escape(sig),
                    escape(key)
                );
            }
            out.push_str("</dl>\n");
        }
        None => out.push_str(
            "<p class=\"unverified\">UNVERIFIED: not signed, the chain did not verify.</p>\n",
        ),
    }
    out.push_str("</section>\n</main>\n</body>\n</html>\n");
    out
}
