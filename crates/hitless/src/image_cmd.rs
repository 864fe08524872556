//! `hitless image build|inspect`.
use std::path::Path;
pub fn build(
    _kind: &str,
    _out: &Path,
    _name: &str,
    _version: &str,
    _binary: &Path,
    _schema: &str,
) -> anyhow::Result<()> {
    anyhow::bail!("image building is not built into this binary yet")
}
pub fn inspect(_dir: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("image inspection is not built into this binary yet")
}
