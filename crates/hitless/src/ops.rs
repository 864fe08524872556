//! Operator commands against a running agent's API.
use std::path::Path;

use crate::ApiArgs;

pub fn agent(_config: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the agent is not built into this binary yet")
}
pub fn status(_api: &ApiArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the agent API client is not built into this binary yet")
}
pub fn upgrade(_api: &ApiArgs, _to: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the agent API client is not built into this binary yet")
}
pub fn operator(_api: &ApiArgs, _what: &str) -> anyhow::Result<()> {
    anyhow::bail!("the agent API client is not built into this binary yet")
}
