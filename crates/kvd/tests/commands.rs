//! Command semantics against a standalone active replica (no network).

use std::sync::Arc;
use std::time::Duration;

use hitless_sync::{Replica, ReplicaConfig};
use kvd::db::{Db, Outcome};
use kvd::resp::Reply;
use kvd::SchemaVersion;

fn db(version: SchemaVersion) -> Arc<Db> {
    let replica = Replica::new(version.schema(), ReplicaConfig::new("test"));
    replica.activate(hitless_control::ControlEpoch(1)).unwrap();
    let db = Arc::new(Db::new(replica, version, Duration::from_millis(200)));
    db.gate.set(|g| {
        g.writable = true;
        g.role = "active";
        g.epoch = hitless_control::ControlEpoch(1);
    });
    db
}

fn run(db: &Db, args: &[&str]) -> Reply {
    let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
    match db.execute(&args, &|| "# Server\r\nrole:test\r\n".to_string()) {
        Outcome::Now(r) | Outcome::Quit(r) | Outcome::NotWritable(r) => r,
        Outcome::Durable(t, r) => {
            db.wait_durable(t).unwrap();
            r
        }
    }
}

fn int(n: i64) -> Reply {
    Reply::Integer(n)
}

fn bulk(s: &str) -> Reply {
    Reply::bulk(s.as_bytes().to_vec())
}

fn bulks(items: &[&str]) -> Reply {
    Reply::bulks(items.iter().map(|s| s.as_bytes().to_vec()))
}

fn is_err(r: &Reply, prefix: &str) -> bool {
    matches!(r, Reply::Error(e) if e.starts_with(prefix))
}

fn both(f: impl Fn(&Db)) {
    f(&db(SchemaVersion::V1));
    f(&db(SchemaVersion::V2));
}

#[test]
fn strings_set_get_incr_mset_mget() {
    both(|d| {
        assert_eq!(run(d, &["PING"]), Reply::Simple("PONG".into()));
        assert_eq!(run(d, &["ping", "hi"]), bulk("hi"));
        assert_eq!(run(d, &["GET", "a"]), Reply::nil());
        assert_eq!(run(d, &["SET", "a", "1"]), Reply::ok());
        assert_eq!(run(d, &["GET", "a"]), bulk("1"));
        assert_eq!(run(d, &["INCR", "a"]), int(2));
        assert_eq!(run(d, &["INCR", "fresh"]), int(1));
        assert_eq!(run(d, &["DECRBY", "fresh", "5"]), int(-4));
        assert_eq!(run(d, &["SET", "a", "x", "NX"]), Reply::nil());
        assert_eq!(run(d, &["SET", "nope", "x", "XX"]), Reply::nil());
        assert_eq!(run(d, &["GET", "a"]), bulk("2"));
        assert!(is_err(
            &run(d, &["SET", "a", "x", "EX", "10"]),
            "ERR key expiry"
        ));
        assert_eq!(run(d, &["SET", "s", "abc"]), Reply::ok());
        assert!(is_err(
            &run(d, &["INCR", "s"]),
            "ERR value is not an integer"
        ));
        assert_eq!(run(d, &["SET", "big", "9223372036854775807"]), Reply::ok());
        assert!(is_err(
            &run(d, &["INCR", "big"]),
            "ERR increment or decrement would overflow"
        ));
        assert_eq!(
            run(d, &["MSET", "k1", "v1", "k2", "v2", "k1", "v3"]),
            Reply::ok()
        );
        assert_eq!(
            run(d, &["MGET", "k1", "k2", "missing"]),
            Reply::Array(Some(vec![bulk("v3"), bulk("v2"), Reply::nil()]))
        );
        assert!(is_err(
            &run(d, &["MSET", "k1"]),
            "ERR wrong number of arguments"
        ));
        assert_eq!(run(d, &["APPEND", "k2", "xy"]), int(4));
        assert_eq!(run(d, &["STRLEN", "k2"]), int(4));
    });
}

#[test]
fn del_exists_dbsize_and_type() {
    both(|d| {
        run(d, &["SET", "a", "1"]);
        run(d, &["RPUSH", "l", "x"]);
        run(d, &["SADD", "s", "m"]);
        assert_eq!(run(d, &["DBSIZE"]), int(3));
        assert_eq!(run(d, &["EXISTS", "a", "l", "s", "zz", "a"]), int(4));
        assert_eq!(run(d, &["TYPE", "l"]), Reply::Simple("list".into()));
        assert_eq!(run(d, &["TYPE", "zz"]), Reply::Simple("none".into()));
        assert_eq!(run(d, &["DEL", "a", "l", "zz"]), int(2));
        assert_eq!(run(d, &["DBSIZE"]), int(1));
        assert_eq!(run(d, &["GET", "a"]), Reply::nil());
    });
}

#[test]
fn lists_push_pop_range() {
    both(|d| {
        assert_eq!(run(d, &["RPUSH", "l", "a", "b", "c"]), int(3));
        assert_eq!(run(d, &["LPUSH", "l", "z", "y"]), int(5));
        assert_eq!(
            run(d, &["LRANGE", "l", "0", "-1"]),
            bulks(&["y", "z", "a", "b", "c"])
        );
        assert_eq!(run(d, &["LRANGE", "l", "1", "2"]), bulks(&["z", "a"]));
        assert_eq!(run(d, &["LRANGE", "l", "-2", "100"]), bulks(&["b", "c"]));
        assert_eq!(run(d, &["LRANGE", "nothing", "0", "-1"]), bulks(&[]));
        assert_eq!(run(d, &["LPOP", "l"]), bulk("y"));
        assert_eq!(run(d, &["RPOP", "l"]), bulk("c"));
        assert_eq!(run(d, &["LPOP", "l", "2"]), bulks(&["z", "a"]));
        assert_eq!(run(d, &["LLEN", "l"]), int(1));
        assert_eq!(run(d, &["RPOP", "l"]), bulk("b"));
        // An emptied list is deleted.
        assert_eq!(run(d, &["EXISTS", "l"]), int(0));
        assert_eq!(run(d, &["LPOP", "l"]), Reply::nil());
        assert_eq!(run(d, &["LPOP", "l", "3"]), Reply::Array(None));
    });
}

#[test]
fn sets_add_pop() {
    both(|d| {
        assert_eq!(run(d, &["SADD", "s", "a", "b", "a", "c"]), int(3));
        assert_eq!(run(d, &["SADD", "s", "a"]), int(0));
        assert_eq!(run(d, &["SMEMBERS", "s"]), bulks(&["a", "b", "c"]));
        assert_eq!(run(d, &["SISMEMBER", "s", "b"]), int(1));
        let mut popped = Vec::new();
        for _ in 0..3 {
            match run(d, &["SPOP", "s"]) {
                Reply::Bulk(Some(m)) => popped.push(m),
                other => panic!("SPOP gave {other:?}"),
            }
        }
        popped.sort();
        assert_eq!(popped, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(run(d, &["SPOP", "s"]), Reply::nil());
        assert_eq!(run(d, &["SCARD", "s"]), int(0));
        assert_eq!(run(d, &["SADD", "t", "x", "y"]), int(2));
        assert_eq!(run(d, &["SREM", "t", "x", "q"]), int(1));
    });
}

#[test]
fn hashes_set_get() {
    both(|d| {
        assert_eq!(run(d, &["HSET", "h", "f1", "v1", "f2", "v2"]), int(2));
        assert_eq!(run(d, &["HSET", "h", "f1", "w1", "f3", "v3"]), int(1));
        assert_eq!(run(d, &["HGET", "h", "f1"]), bulk("w1"));
        assert_eq!(run(d, &["HGET", "h", "nope"]), Reply::nil());
        assert_eq!(run(d, &["HLEN", "h"]), int(3));
        assert_eq!(
            run(d, &["HGETALL", "h"]),
            bulks(&["f1", "w1", "f2", "v2", "f3", "v3"])
        );
        assert_eq!(run(d, &["HDEL", "h", "f1", "f9"]), int(1));
        assert!(is_err(&run(d, &["HSET", "h", "f1"]), "ERR wrong number"));
    });
}

#[test]
fn sorted_sets_add_popmin_range() {
    both(|d| {
        assert_eq!(run(d, &["ZADD", "z", "3", "c", "1", "a", "2", "b"]), int(3));
        assert_eq!(run(d, &["ZADD", "z", "0.5", "c"]), int(0));
        assert_eq!(run(d, &["ZADD", "z", "CH", "0.25", "c"]), int(1));
        assert_eq!(run(d, &["ZADD", "z", "NX", "9", "a", "4", "d"]), int(1));
        assert_eq!(run(d, &["ZSCORE", "z", "a"]), bulk("1"));
        assert_eq!(
            run(d, &["ZRANGE", "z", "0", "-1"]),
            bulks(&["c", "a", "b", "d"])
        );
        assert_eq!(
            run(d, &["ZRANGE", "z", "0", "1", "WITHSCORES"]),
            bulks(&["c", "0.25", "a", "1"])
        );
        assert_eq!(run(d, &["ZPOPMIN", "z"]), bulks(&["c", "0.25"]));
        assert_eq!(run(d, &["ZPOPMIN", "z", "2"]), bulks(&["a", "1", "b", "2"]));
        assert_eq!(run(d, &["ZCARD", "z"]), int(1));
        assert!(is_err(
            &run(d, &["ZADD", "z", "nan", "x"]),
            "ERR value is not a valid float"
        ));
        assert!(is_err(&run(d, &["ZADD", "z", "1"]), "ERR wrong number"));
        assert!(is_err(
            &run(d, &["ZADD", "z", "1", "a", "2"]),
            "ERR syntax error"
        ));
        assert_eq!(run(d, &["ZPOPMIN", "none"]), bulks(&[]));
    });
}

#[test]
fn wrong_type_is_refused_and_set_overwrites_any_type() {
    both(|d| {
        run(d, &["RPUSH", "k", "a"]);
        let wrong = "WRONGTYPE";
        assert!(is_err(&run(d, &["GET", "k"]), wrong));
        assert!(is_err(&run(d, &["INCR", "k"]), wrong));
        assert!(is_err(&run(d, &["SADD", "k", "m"]), wrong));
        assert!(is_err(&run(d, &["HSET", "k", "f", "v"]), wrong));
        assert!(is_err(&run(d, &["ZADD", "k", "1", "m"]), wrong));
        assert_eq!(run(d, &["LRANGE", "k", "0", "-1"]), bulks(&["a"]));
        assert_eq!(run(d, &["SET", "k", "v"]), Reply::ok());
        assert_eq!(run(d, &["GET", "k"]), bulk("v"));
        assert_eq!(run(d, &["DBSIZE"]), int(1));
        assert!(is_err(&run(d, &["LPUSH", "k", "x"]), wrong));
    });
}

#[test]
fn admin_commands_answer_for_redis_tools() {
    both(|d| {
        assert_eq!(run(d, &["SELECT", "0"]), Reply::ok());
        assert!(is_err(&run(d, &["SELECT", "1"]), "ERR DB index"));
        assert_eq!(run(d, &["CONFIG", "GET", "save"]), bulks(&["save", ""]));
        assert_eq!(
            run(d, &["CONFIG", "GET", "appendonly"]),
            bulks(&["appendonly", "no"])
        );
        assert_eq!(run(d, &["CONFIG", "GET", "maxmemory"]), bulks(&[]));
        assert_eq!(run(d, &["COMMAND", "DOCS"]), bulks(&[]));
        assert!(matches!(run(d, &["COMMAND", "COUNT"]), Reply::Integer(n) if n > 20));
        assert_eq!(run(d, &["QUIT"]), Reply::ok());
        match run(d, &["INFO"]) {
            Reply::Bulk(Some(b)) => {
                let s = String::from_utf8(b).unwrap();
                assert!(s.contains("role:test") && s.contains("db0:keys=0"), "{s}");
            }
            other => panic!("INFO gave {other:?}"),
        }
        assert_eq!(
            run(d, &["FLUSHEVERYTHING", "a"]),
            Reply::err("unknown command 'flusheverything', with args beginning with: 'a'")
        );
        assert!(is_err(
            &run(d, &["GET"]),
            "ERR wrong number of arguments for 'get'"
        ));
    });
}

#[test]
fn closed_gate_refuses_writes_but_serves_reads() {
    let d = db(SchemaVersion::V2);
    run(&d, &["SET", "a", "1"]);
    d.gate.set(|g| {
        g.writable = false;
        g.role = "standby";
    });
    assert!(is_err(&run(&d, &["SET", "a", "2"]), "READONLY"));
    assert!(is_err(&run(&d, &["DEL", "a"]), "READONLY"));
    assert_eq!(run(&d, &["GET", "a"]), bulk("1"));
}

#[test]
fn quiesced_gate_holds_writes_until_released() {
    let d = db(SchemaVersion::V1);
    d.gate.set(|g| g.quiesced = true);
    // Not released within the hold time: a clear TRYAGAIN, nothing written.
    assert!(is_err(&run(&d, &["SET", "a", "1"]), "TRYAGAIN"));
    assert_eq!(run(&d, &["GET", "a"]), Reply::nil());
    // Released while waiting: the write goes through.
    let d2 = d.clone();
    let writer = std::thread::spawn(move || run(&d2, &["SET", "a", "2"]));
    std::thread::sleep(Duration::from_millis(50));
    d.gate.set(|g| g.quiesced = false);
    assert_eq!(writer.join().unwrap(), Reply::ok());
    assert_eq!(run(&d, &["GET", "a"]), bulk("2"));
}

#[test]
fn v2_records_carry_metadata_and_v1_records_are_raw() {
    use kvd::schema::{decode, STRINGS};
    let d1 = db(SchemaVersion::V1);
    run(&d1, &["SET", "k", "hello"]);
    assert_eq!(d1.replica().get(STRINGS, b"k").unwrap().unwrap(), b"hello");

    let d2 = db(SchemaVersion::V2);
    run(&d2, &["SET", "k", "a"]);
    run(&d2, &["SET", "other", "x"]);
    run(&d2, &["SET", "k", "b"]);
    let raw = d2.replica().get(STRINGS, b"k").unwrap().unwrap();
    let (_, meta) = decode(SchemaVersion::V2, STRINGS, &raw).unwrap();
    assert_eq!(meta.version, 2);
    assert!(
        meta.created_seq >= 1 && meta.updated_seq > meta.created_seq,
        "{meta:?}"
    );
}
