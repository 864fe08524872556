#![allow(dead_code)]
use std::net::TcpListener;
use std::time::Duration;

use hitless_sync::{Mutation, Record, Replica, ReplicaConfig, Schema, ServeHandle};

/// v1: table "kv", value = raw text. v2: adds table "meta"; "kv" values are "v2|" + text.
pub fn schema(version: u32) -> Schema {
    let mut s = Schema::new("kv", version)
        .table_in(1, "kv")
        .table_in(2, "kv")
        .table_in(2, "meta");
    if version >= 2 {
        s = s
            .upgrade(1, |r: &Record| {
                Ok(Some(Record {
                    value: [b"v2|".as_slice(), &r.value].concat(),
                    ..r.clone()
                }))
            })
            .downgrade(2, |r: &Record| {
                if r.table == "meta" {
                    return Ok(None);
                }
                match r.value.strip_prefix(b"v2|") {
                    Some(v) => Ok(Some(Record {
                        value: v.to_vec(),
                        ..r.clone()
                    })),
                    None => Err("value lacks the v2| prefix".into()),
                }
            });
    }
    s
}

pub fn config(node: &str) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node);
    c.ack_timeout = Duration::from_secs(5);
    c.heartbeat = Duration::from_millis(50);
    c.link_timeout = Duration::from_secs(2);
    c
}

pub fn active(version: u32, node: &str) -> (Replica, ServeHandle) {
    let r = Replica::new(schema(version), config(node));
    r.activate(hitless_sync::ControlEpoch(1)).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let h = r.serve(l).unwrap();
    (r, h)
}

pub fn standby(version: u32, node: &str) -> Replica {
    Replica::new(schema(version), config(node))
}

pub fn put(k: u64, v: &str) -> Mutation {
    Mutation::put("kv", format!("k{k}").into_bytes(), v.as_bytes().to_vec())
}

pub fn put_v2(k: u64, v: &str) -> Mutation {
    Mutation::put(
        "kv",
        format!("k{k}").into_bytes(),
        format!("v2|{v}").into_bytes(),
    )
}
