//! `hitless sim issu`: the ISSU engine against a simulated pair.
pub fn run(_fault: Option<String>, _json: bool, _list_faults: bool) -> anyhow::Result<()> {
    anyhow::bail!("the simulator is not built into this binary yet")
}
