//! redis-benchmark against kvd (an active with a synchronous standby of the other version):
//! every default test the brief lists must complete with zero errors.

mod common;

use std::process::Command;

use common::{tempdir, Instance};
use hitless_control::Role;
use kvd::resp::Reply;

const TESTS: &str = "ping_inline,ping_mbulk,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange_100,lrange_300,lrange_500,lrange_600,mset";

#[test]
fn redis_benchmark_runs_every_test_without_errors() {
    if Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipping: redis-benchmark is not installed (apt install redis-tools)");
        return;
    }
    let dir = tempdir("bench");
    let mut active = Instance::start(2, "bench-active", &dir);
    let mut standby = Instance::start(1, "bench-standby", &dir);
    active.configure(Role::Active, 1, None, false);
    standby.configure(Role::Standby, 1, Some(&active), true);
    standby.wait_for("standby ready", |s| s.ready);

    let port = active
        .hello
        .service_addr
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "-n",
            "2000",
            "-c",
            "20",
            "-t",
            TESTS,
        ])
        .output()
        .expect("run redis-benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "redis-benchmark failed: {stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("Error") && !stderr.contains("Error"),
        "errors reported: {stdout}\n{stderr}"
    );
    // The final figure of each test is the text after the last carriage return of its line.
    let finals: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit('\r').next())
        .filter(|l| l.contains("requests per second"))
        .collect();
    for name in [
        "PING_INLINE",
        "PING_MBULK",
        "SET",
        "GET",
        "INCR",
        "LPUSH",
        "RPUSH",
        "LPOP",
        "RPOP",
        "SADD",
        "HSET",
        "SPOP",
        "ZADD",
        "ZPOPMIN",
        "LRANGE_100",
        "LRANGE_300",
        "LRANGE_500",
        "LRANGE_600",
        "MSET",
    ] {
        assert!(
            finals
                .iter()
                .any(|l| l.trim_start().starts_with(&format!("{name}:"))
                    || l.trim_start().starts_with(&format!("{name} ("))),
            "no result for {name}:\n{stdout}"
        );
    }
    for l in &finals {
        println!("{}", l.trim());
    }

    // Everything acknowledged reached the standby, converted to its schema version.
    let mut c = active.client();
    assert!(matches!(
        c.cmd(&["GET", "counter:__rand_int__"]),
        Reply::Bulk(Some(_))
    ));
    let seq = active.status().services["kv"].applied_seq;
    standby.wait_for("standby caught up", |s| s.services["kv"].applied_seq >= seq);
    assert_eq!(standby.client().cmd(&["DBSIZE"]), c.cmd(&["DBSIZE"]));
    assert_eq!(
        standby.client().cmd(&["GET", "counter:__rand_int__"]),
        c.cmd(&["GET", "counter:__rand_int__"])
    );
    let _ = std::fs::remove_dir_all(&dir);
}
