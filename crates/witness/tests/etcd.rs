//! The etcd witness against a real etcd server (`/usr/bin/etcd`, Debian's `etcd-server`,
//! installed by `scripts/setup`). Each test starts its own server on free ports with a
//! temporary data directory and kills it when it ends.
//!
//! Without `/usr/bin/etcd` these tests fail, unless `HITLESS_SKIP_ETCD=1` is set.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hitless_core::{ControlEpoch, InstanceId};
use hitless_witness::{
    change, Decided, EtcdWitness, Lease, Witness, WitnessChange, WitnessError, WitnessKind,
};

const ETCD: &str = "/usr/bin/etcd";
const TIMEOUT: Duration = Duration::from_millis(1_000);
/// Longest wait for a started server to answer.
const START_BOUND: Duration = Duration::from_secs(30);

/// The etcd binary, or `None` when the tests are skipped on purpose.
fn etcd_binary() -> Option<PathBuf> {
    if Path::new(ETCD).exists() {
        return Some(PathBuf::from(ETCD));
    }
    if std::env::var("HITLESS_SKIP_ETCD").as_deref() == Ok("1") {
        eprintln!("{ETCD} is missing and HITLESS_SKIP_ETCD=1: the etcd witness is not tested");
        return None;
    }
    panic!(
        "{ETCD} is missing: run scripts/setup (it installs Debian's etcd-server), \
         or set HITLESS_SKIP_ETCD=1 to skip the etcd witness tests"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// One etcd server; killed when dropped.
struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

impl Etcd {
    /// Starts a one-member cluster and waits until it answers.
    async fn start() -> Option<Etcd> {
        let bin = etcd_binary()?;
        let mut e = Etcd {
            bin,
            dir: tempfile::tempdir().expect("tempdir"),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            child: None,
        };
        e.spawn().await;
        Some(e)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts the server on its data directory (again, after [`Etcd::kill`]).
    async fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(&self.bin)
            .arg("--name=default")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster=default={}", self.peer_url))
            // etcd's minimum lease is 1.5 election timeouts rounded up to whole seconds: 2 s
            // with the defaults, 1 s with these. The conformance suite waits 2.2 s for a
            // lease to run out, and etcd checks expiry every 500 ms.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("etcd exited with {status}: {}", self.log());
            }
            let client = self.client("readiness-probe").await;
            if let Ok(w) = client {
                if w.read().await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within {START_BOUND:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn client(&self, pair: &str) -> Result<EtcdWitness, WitnessError> {
        EtcdWitness::connect(vec![self.client_url.clone()], pair.into(), TIMEOUT).await
    }

    /// SIGKILL, no chance to flush anything.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw etcd client, to write what another writer might.
async fn raw(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .expect("raw etcd client")
}

#[tokio::test]
async fn the_etcd_witness_passes_the_conformance_suite() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let a = etcd.client("conformance").await.expect("client a");
    let b = etcd.client("conformance").await.expect("client b");
    assert_eq!(a.kind(), WitnessKind::Etcd);
    hitless_witness::conformance::run_all(&a, &b).await;
}

#[tokio::test]
async fn the_lease_key_names_its_holder_with_an_etcd_lease_rounded_up_to_whole_seconds() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let w = etcd.client("lease-key").await.expect("client");
    let asked = Duration::from_millis(2_500);
    assert_eq!(
        w.lease("primary", asked).await.expect("lease"),
        Lease::Granted { ttl: asked }
    );
    let mut raw = raw(&etcd).await;
    let got = raw.get(w.lease_key(), None).await.expect("get");
    let kv = got.kvs().first().expect("the lease key is written");
    assert_eq!(kv.value(), b"primary");
    let ttl = raw.lease_time_to_live(kv.lease(), None).await.expect("ttl");
    assert_eq!(ttl.granted_ttl(), 3, "2.5 s rounds up to 3 s");
    let other = etcd.client("lease-key").await.expect("client");
    match other.lease("secondary", asked).await.expect("lease") {
        Lease::Refused {
            holder,
            retry_after,
        } => {
            assert_eq!(holder.as_deref(), Some("primary"));
            assert!(
                retry_after > Duration::ZERO && retry_after <= asked,
                "{retry_after:?}"
            );
        }
        Lease::Granted { .. } => panic!("two holders of one lease"),
    }
    // A renewal asking for more than the etcd lease holds attaches a longer one.
    let longer = Duration::from_secs(5);
    assert!(matches!(
        w.lease("primary", longer).await.expect("renew"),
        Lease::Granted { .. }
    ));
    let got = raw.get(w.lease_key(), None).await.expect("get");
    let kv = got.kvs().first().expect("still held");
    let ttl = raw.lease_time_to_live(kv.lease(), None).await.expect("ttl");
    assert_eq!(ttl.granted_ttl(), 5);
    w.release("primary").await.expect("release");
    let got = raw.get(w.lease_key(), None).await.expect("get");
    assert!(got.kvs().is_empty(), "a released lease leaves no key");
}

#[tokio::test]
async fn an_unreachable_etcd_answers_unreachable_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    // A port nobody listens on, and a listener that never speaks.
    let refused = format!("http://127.0.0.1:{}", free_port());
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = format!("http://{}", silent.local_addr().expect("addr"));
    for endpoint in [refused, silent] {
        let start = Instant::now();
        let answer = match EtcdWitness::connect(vec![endpoint.clone()], "cut".into(), timeout).await
        {
            Ok(w) => w.read().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let took = start.elapsed();
        match answer {
            Err(WitnessError::Unreachable { .. }) => {}
            other => panic!("{endpoint}: expected unreachable, got {other:?}"),
        }
        // Connecting and one request, each bounded by the timeout.
        assert!(
            took < 2 * timeout + Duration::from_millis(200),
            "{endpoint}: unreachable only after {took:?}"
        );
    }
}

#[tokio::test]
async fn a_record_that_is_not_json_is_bad_and_left_in_place() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let w = etcd.client("garbled").await.expect("client");
    let mut raw = raw(&etcd).await;
    raw.put(w.record_key(), "not json{", None)
        .await
        .expect("put");
    match w.read().await {
        Err(WitnessError::BadRecord(m)) => assert!(m.contains("JSON"), "{m}"),
        other => panic!("expected a bad record, got {other:?}"),
    }
    let init = WitnessChange::Init {
        in_control: InstanceId(1),
        epoch: ControlEpoch(1),
    };
    match change(&w, &init).await {
        Err(WitnessError::BadRecord(_)) => {}
        other => panic!("a change over a bad record answered {other:?}"),
    }
    let got = raw.get(w.record_key(), None).await.expect("get");
    assert_eq!(
        got.kvs().first().map(|kv| kv.value()),
        Some(&b"not json{"[..]),
        "the bad record is left for the operator"
    );
    // JSON that breaks the record's own limits is bad too.
    raw.put(
        w.record_key(),
        r#"{"epoch":2,"in_control":1,"sync_set":[1]}"#,
        None,
    )
    .await
    .expect("put");
    assert!(matches!(w.read().await, Err(WitnessError::BadRecord(_))));
}

#[tokio::test]
async fn a_record_survives_an_etcd_restart() {
    let Some(mut etcd) = Etcd::start().await else {
        return;
    };
    let w = etcd.client("restart").await.expect("client");
    let init = WitnessChange::Init {
        in_control: InstanceId(1),
        epoch: ControlEpoch(1),
    };
    let before = match change(&w, &init).await.expect("init") {
        Decided::Granted(v) => v,
        Decided::Refused(r) => panic!("init refused: {r}"),
    };
    etcd.kill();
    assert!(
        matches!(w.read().await, Err(WitnessError::Unreachable { .. })),
        "a killed etcd is unreachable"
    );
    etcd.spawn().await;
    let fresh = etcd.client("restart").await.expect("client");
    assert_eq!(fresh.read().await.expect("read"), before);
    // The first client reconnects by itself.
    let deadline = Instant::now() + START_BOUND;
    loop {
        match w.read().await {
            Ok(v) => {
                assert_eq!(v, before);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no reconnection: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
