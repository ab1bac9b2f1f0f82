//! The `[[hook]]` entries of `master.toml`: webhook endpoints and the
//! builders they may trigger.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nightshift_proto::diag::ConfigErrors;
use serde::Deserialize;

use super::builders::BuilderDef;
use super::names::{Written, valid_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    name: String,
    kind: HookKind,
    secret_file: Option<String>,
    #[serde(default)]
    builders: Vec<String>,
}

/// Which forge's push events a hook understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// GitHub: `X-Hub-Signature-256` (HMAC-SHA256 of the body).
    Github,
    /// Gitea and Forgejo: `X-Hub-Signature-256`, `X-Gitea-Signature` or
    /// `X-Forgejo-Signature` (HMAC-SHA256 of the body).
    #[serde(alias = "forgejo")]
    Gitea,
    /// GitLab: `X-Gitlab-Token` (the secret itself).
    Gitlab,
    /// `{"repository", "branch", "revision"}` with `Authorization: Bearer <secret>`.
    Generic,
}

/// One `[[hook]]`: a webhook endpoint at `/hooks/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDef {
    pub name: String,
    pub kind: HookKind,
    /// File holding the shared secret (read at each delivery, so rotating
    /// it needs no reconfig).
    pub secret_file: PathBuf,
    /// Builders this hook may trigger (empty: every builder whose source
    /// repository matches the pushed one).
    pub builders: Vec<String>,
}

/// Checks the `[[hook]]` entries against the builders defined; relative
/// secret files resolve against `base`.
pub(super) fn parse_hooks(
    raw: Vec<RawHook>,
    builders: &[BuilderDef],
    base: &Path,
    written: &Written,
    errors: &mut ConfigErrors,
) -> Vec<HookDef> {
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let mut hooks = Vec::new();
    let mut hook_names = BTreeSet::new();
    for (i, h) in raw.into_iter().enumerate() {
        if !valid_name(&h.name) {
            issue(
                format!("hook[{i}].name"),
                format!(
                    "`{}` is not a valid name (letters, digits, `-`, `_`, `.`)",
                    h.name
                ),
            );
        } else if !hook_names.insert(h.name.clone()) {
            issue(
                format!("hook[{i}].name"),
                format!("hook `{}` is defined twice", h.name),
            );
        }
        let secret_file = match &h.secret_file {
            Some(path) => base.join(path),
            None => {
                issue(
                    format!("hook[{i}].secret_file"),
                    "missing: the file holding the hook's shared secret".into(),
                );
                PathBuf::new()
            }
        };
        for (j, builder) in h.builders.iter().enumerate() {
            match builders.iter().find(|b| &b.name == builder) {
                Some(b) if b.source.is_none() => issue(
                    format!("hook[{i}].builders[{j}]"),
                    format!("builder `{builder}` has no `source`; a push cannot name its revision"),
                ),
                Some(_) => {}
                None if written.builders.contains(builder) => {}
                None => issue(
                    format!("hook[{i}].builders[{j}]"),
                    format!("unknown builder `{builder}` (no [[builder]] with that name)"),
                ),
            }
        }
        hooks.push(HookDef {
            name: h.name,
            kind: h.kind,
            secret_file,
            builders: h.builders,
        });
    }
    hooks
}
