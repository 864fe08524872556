//! An appliance starts a real service from its image's service contract and stops it
//! gracefully (runs as root: the process sandbox needs namespaces).
//!
//! The service is the reference kvd, found beside this test's executable
//! (`cargo build -p kvd` puts `kvd-v1` there).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_agent::appliance::{Appliance, Op, OpOk};
use hitless_agent::config::{AgentConfig, BackendKind, InstanceConfig};
use hitless_agent::front::{Front, FrontLimits};
use hitless_agent::images::ImageCatalog;
use hitless_core::{ApplianceId, ControlEpoch, InstanceId};
use hitless_image::service::{Protocol, ServiceContract};

fn kvd_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("kvd-v1");
    bin.is_file().then_some(bin)
}

/// kvd's contract, spelled with options of its own (`--service-listen=ADDR` rather than the
/// two-word form the legacy contract uses), so the command line can only come from the
/// template. It declares the opaque protocol (kvd's RESP passes through as bytes), so the
/// front's protocol can only come from the contract.
fn kvd_contract() -> ServiceContract {
    let args: Vec<String> = [
        "--instance-id={instance_id}",
        "--service-listen={service_listen}",
        "--sync-listen={sync_listen}",
        "--control-listen={control}",
        "--ha-grace-ms={ha_grace_ms}",
    ]
    .map(String::from)
    .into();
    ServiceContract::from_parts(Protocol::Opaque, 6379, 7000, &args).unwrap()
}

#[test]
fn an_instance_runs_from_its_contract_and_stops_gracefully() {
    let Some(bin) = kvd_binary() else {
        eprintln!("SKIPPED: kvd-v1 is not built beside the tests (cargo build -p kvd)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let schemas = hitless_image::manifest::parse_schema_spec("kvd=1:1").unwrap();
    let dir = tmp.path().join("img");
    hitless_image::build::process_image(&dir, "kvd", "1.0.0", &bin, &kvd_contract(), &schemas)
        .unwrap();
    let mut catalog = ImageCatalog::default();
    let image = catalog.add(&dir).unwrap();
    // Ports of this test's own, away from the lab's and below the ephemeral range.
    let port_base = 21000 + (std::process::id() % 250) as u16 * 40;
    let config = AgentConfig {
        appliance: ApplianceId::Primary,
        api_listen: "127.0.0.1:0".parse().unwrap(),
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        peer_addr: "127.0.0.1:9".parse().unwrap(),
        service_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: tmp.path().join("data"),
        image: dir.clone(),
        backend: BackendKind::Process,
        heartbeat: Default::default(),
        instances: InstanceConfig {
            port_base,
            stop_grace_ms: 5000,
            ..InstanceConfig::default()
        },
        vip: None,
        witness: Default::default(),
        api: Default::default(),
    };
    let backend: Arc<dyn hitless_vmm::Backend> = Arc::new(hitless_vmm::ProcessBackend::new(
        hitless_vmm::ProcessConfig::default(),
    ));
    let front = Front::new(FrontLimits::default()).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let appliance = Appliance::new(
        ApplianceId::Primary,
        config,
        backend,
        catalog,
        front.clone(),
        tx,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = InstanceId(1);
    let started = match rt.block_on(appliance.exec(Op::Start {
        instance: id,
        image: image.clone(),
    })) {
        Ok(OpOk::Started(s)) => s,
        other => panic!("start: {other:?}"),
    };
    // The instance answered its Hello on the control socket named by {control}, and serves
    // on the address named by {service_listen}.
    assert_eq!(started.hello.instance_id, id.to_string());
    assert_eq!(started.service_addr.port(), port_base);
    assert_eq!(started.protocol, Protocol::Opaque);
    // Routing the front to it carries its protocol to the front.
    assert_eq!(front.protocol(), Protocol::Resp);
    let route = hitless_agent::front::Route {
        epoch: ControlEpoch(1),
        backend: Some(started.service_addr),
        hold: false,
    };
    match rt.block_on(appliance.exec(Op::FrontRoute {
        route: route.clone(),
        listen: false,
        protocol: Some(started.protocol),
    })) {
        Ok(OpOk::Done) => {}
        other => panic!("front route: {other:?}"),
    }
    assert_eq!(front.protocol(), Protocol::Opaque);
    assert_eq!(front.route(), route);
    let mut c = std::net::TcpStream::connect(started.service_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut c, b"PING\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut c, &mut buf).unwrap();
    assert!(n > 0, "the service answered nothing");
    drop(c);
    // The reported pid is the service's own (the sandbox's init is its parent).
    let pid = started.pid.unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("kvd"), "{comm}");

    let t = Instant::now();
    let exit = match rt.block_on(appliance.exec(Op::Stop { instance: id })) {
        Ok(OpOk::Stopped { exit }) => exit,
        other => panic!("stop: {other:?}"),
    };
    assert!(
        !exit.contains("signal 9") && !exit.contains("code 137"),
        "the instance was killed: {exit}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
