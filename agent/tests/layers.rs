//! The agent's modules form layers: each may use only modules of lower layers (and the
//! crates below the agent: `portcullis-core`, `-policy`, `-pgwire`, `-sql`, `-audit-store`,
//! `-common`). This test reads every `crate::<module>` path in the agent's sources and fails
//! on one that reaches up or sideways, so an import cycle cannot come back. The picture is
//! in docs/ARCHITECTURE.md ("Layers").

#![allow(
    clippy::unwrap_used,
    reason = "a test: a source it cannot read is a failure"
)]

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. A module may use the modules of lower ranks only.
const LAYERS: &[(&str, u8)] = &[
    // Helpers with no agent knowledge: syscalls, log setup, TLS roots.
    ("sys", 0),
    ("logging", 0),
    ("tls", 0),
    ("config", 1),
    // The configuration reference rendered from the typed config (docs/configuration.md).
    ("config_reference", 2),
    // Services over the configuration, each on its own.
    ("dns", 2),
    ("limits", 2),
    ("audit", 2),
    ("ca", 3),
    ("ssh_ca", 3),
    ("ebpf", 3),
    ("listeners", 3),
    ("identity", 4),
    ("policy", 4),
    // Requests, decisions and grants; segregation of duties (`approvals::duties`).
    ("approvals", 4),
    // From an accepted socket to an allowed, recorded connection.
    ("admission", 5),
    // Access reviews: the audit trail read back and the policies in force, side by side.
    ("review", 5),
    // Protocols use admission, never the proxy.
    ("protocol", 6),
    ("proxy", 7),
    ("control", 8),
    // The web console: the browser's counterpart of the control socket.
    ("console", 8),
    ("agent", 9),
    ("cli", 10),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, r)| r)
}

/// The top-level module a source file belongs to (`protocol/postgres/session.rs` → `protocol`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// The modules a source text names as `crate::<module>` outside comments.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((n + 1, name));
            }
        }
        // `use crate::{a, b::c}` names several.
        if let Some(at) = code.find("crate::{") {
            let group = &code[at + "crate::{".len()..];
            for part in group.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut unknown = BTreeMap::new();
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        if module == "main" {
            continue;
        }
        let Some(own) = rank(&module) else {
            unknown.insert(module, file.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, used) in uses(&text) {
            if used == module {
                continue;
            }
            match rank(&used) {
                Some(r) if r < own => {}
                Some(r) => violations.push(format!(
                    "{}:{line}: `{module}` (layer {own}) uses `{used}` (layer {r})",
                    file.display()
                )),
                // Not a module of the agent's (an item of main.rs, say): nothing to check.
                None => {}
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS (give each a layer): {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "modules using a module of their own or a higher layer:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_reader_finds_uses_in_paths_and_groups() {
    let found = uses(
        "use crate::audit::AuditLog;\nuse crate::{config, identity::Identity};\n// crate::proxy in a comment\nlet x = crate::policy::outcome(d); // crate::cli\n",
    );
    let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["audit", "config", "identity", "policy"]);
}
