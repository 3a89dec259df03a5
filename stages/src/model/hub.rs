//! `hf://org/name[@revision]`: a model the Hugging Face hub client (`hf download`,
//! `huggingface-cli download`, transformers) already downloaded, found in its cache without a
//! network: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out as
//! `models--org--name/refs/<revision>` (a commit id) and `snapshots/<commit>/<files>`.

use std::path::{Path, PathBuf};

/// The prefix of a model reference in the Hugging Face cache.
pub const PREFIX: &str = "hf://";

/// Whether `reference` names a model in the Hugging Face cache.
pub fn is_hub(reference: &str) -> bool {
    reference.starts_with(PREFIX)
}

/// The cache's root.
fn cache_root() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".cache/huggingface/hub")
        })
}

/// The snapshot directory `hf://org/name[@revision]` names (revision `main` by default; a
/// 40-digit commit id is used as is).
pub fn resolve(reference: &str) -> Result<PathBuf, String> {
    resolve_in(&cache_root(), reference)
}

/// [`resolve`] in the cache at `root`.
pub fn resolve_in(root: &Path, reference: &str) -> Result<PathBuf, String> {
    let name = reference.strip_prefix(PREFIX).unwrap_or(reference);
    let (repo, revision) = name.split_once('@').unwrap_or((name, "main"));
    let parts: Vec<&str> = repo.split('/').collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() != 2 || !parts.iter().all(|p| valid(p)) || !valid(revision) {
        return Err(format!(
            "`{reference}` is not a model reference: write hf://org/name or hf://org/name@revision"
        ));
    }
    let dir = root.join(format!("models--{}--{}", parts[0], parts[1]));
    let missing = |looked: &Path| {
        format!(
            "`{reference}` is not in the Hugging Face cache (looked for {}); download it once \
             with `hf download {repo}` (or `huggingface-cli download {repo}`), or set \
             HF_HOME / HF_HUB_CACHE to the cache that has it",
            looked.display()
        )
    };
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        let reference_file = dir.join("refs").join(revision);
        let text =
            std::fs::read_to_string(&reference_file).map_err(|_| missing(&reference_file))?;
        text.trim().to_string()
    };
    let snapshot = dir.join("snapshots").join(&commit);
    if !valid(&commit) || !snapshot.is_dir() {
        return Err(missing(&snapshot));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_to_the_snapshot_their_revision_names() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--HuggingFaceTB--SmolLM2-135M");
        let commit = "12fd25f77366fa6b3b4b768ec3050bf629380bac";
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let snapshot = repo.join("snapshots").join(commit);
        let resolve = |r: &str| resolve_in(root.path(), r);
        assert_eq!(
            resolve("hf://HuggingFaceTB/SmolLM2-135M").unwrap(),
            snapshot
        );
        assert_eq!(
            resolve(&format!("hf://HuggingFaceTB/SmolLM2-135M@{commit}")).unwrap(),
            snapshot
        );
        let err = resolve("hf://HuggingFaceTB/SmolLM2-360M").unwrap_err();
        assert!(
            err.contains("is not in the Hugging Face cache (looked for"),
            "{err}"
        );
        assert!(
            err.contains("`hf download HuggingFaceTB/SmolLM2-360M`"),
            "{err}"
        );
        let err = resolve("hf://HuggingFaceTB/SmolLM2-135M@v2").unwrap_err();
        assert!(err.contains("refs/v2"), "{err}");
        let err = resolve("hf://../../etc").unwrap_err();
        assert!(err.contains("is not a model reference"), "{err}");
    }
}
