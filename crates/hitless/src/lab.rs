//! `hitless lab`: a local pair of appliance agents on this machine.
use std::path::Path;

use crate::{LabIssuArgs, LabUpArgs};

/// The lab's default run directory.
pub const DEFAULT_DIR: &str = "/tmp/hitless-lab";

pub fn up(_args: &LabUpArgs) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built into this binary yet")
}
pub fn down(_dir: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built into this binary yet")
}
pub fn status(_dir: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built into this binary yet")
}
pub fn issu(_args: &LabIssuArgs) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built into this binary yet")
}
