//! The runner's Lua scripts (`shared/lua/*.lua`) called directly against a
//! real redis-server: each write kind of the acknowledgement script, its
//! fence, and the lease and member scripts.

use botline_shared::scripts::{ACK, LEASE, MEMBERS, RETIRE};
use botline_shared::testing::RedisServer;
use redis::{Connection, Value};

const OWNER: &str = "{t:p0}:owner:g";
const INPUT: &str = "{t:p0}:in";

/// A partition owned by `me`, with one entry of `INPUT` pending for `me`; its id.
fn setup(connection: &mut Connection) -> String {
    let _: () = redis::cmd("SET")
        .arg(OWNER)
        .arg("me")
        .query(connection)
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(INPUT)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query(connection)
        .unwrap();
    let id: String = redis::cmd("XADD")
        .arg(INPUT)
        .arg("*")
        .arg("f")
        .arg("v")
        .query(connection)
        .unwrap();
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("me")
        .arg("STREAMS")
        .arg(INPUT)
        .arg(">")
        .query(connection)
        .unwrap();
    id
}

/// Call the acknowledgement script with `keys` (the owner key first) and
/// `args` after group `g` and consumer `consumer`.
fn ack(connection: &mut Connection, consumer: &str, keys: &[&str], args: &[&str]) -> Value {
    let mut invocation = ACK.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    invocation.arg("g").arg(consumer);
    for arg in args {
        invocation.arg(*arg);
    }
    invocation.invoke(connection).unwrap()
}

fn xlen(connection: &mut Connection, key: &str) -> usize {
    redis::cmd("XLEN").arg(key).query(connection).unwrap()
}

fn pending(connection: &mut Connection) -> usize {
    let summary: Value = redis::cmd("XPENDING")
        .arg(INPUT)
        .arg("g")
        .query(connection)
        .unwrap();
    match summary {
        Value::Array(parts) => match &parts[0] {
            Value::Int(n) => *n as usize,
            other => panic!("XPENDING count {other:?}"),
        },
        other => panic!("XPENDING {other:?}"),
    }
}

fn pttl(connection: &mut Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(connection).unwrap()
}

#[test]
fn add_acknowledges_and_adds() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let out = "{t:p0}:q";
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT, out],
        &[
            "1", "2", &id, "1", "add", "3", "0", "0", "2", "a", "1", "b", "2",
        ],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(1)]));
    assert_eq!(pending(&mut c), 0);
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(out)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1, vec!["a", "1", "b", "2"]);
    assert_eq!(pttl(&mut c, out), -1, "no expiry asked for");
}

#[test]
fn add_capped_with_expiry_caps_and_expires_the_stream() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let side = "{t:p0}:ctx:web:c1";
    // Far more than the cap already there; `MAXLEN ~` trims whole nodes.
    for n in 0..500 {
        let _: String = redis::cmd("XADD")
            .arg(side)
            .arg("*")
            .arg("n")
            .arg(n)
            .query(&mut c)
            .unwrap();
    }
    let id = setup(&mut c);
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT, side],
        &[
            "1", "2", &id, "1", "add", "3", "10", "60000", "1", "n", "new",
        ],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(1)]));
    let len = xlen(&mut c, side);
    assert!(len < 500, "the stream was capped: {len} left");
    let ttl = pttl(&mut c, side);
    assert!(ttl > 50_000 && ttl <= 60_000, "expires in a minute: {ttl}");
    let last: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(side)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut c)
        .unwrap();
    assert_eq!(last[0].1, vec!["n", "new"]);
}

#[test]
fn set_sets_with_expiry() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let key = "{t:p0}:sent:r1";
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT, key],
        &["1", "2", &id, "1", "set", "3", "yes", "30000"],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(1)]));
    let value: String = redis::cmd("GET").arg(key).query(&mut c).unwrap();
    assert_eq!(value, "yes");
    let ttl = pttl(&mut c, key);
    assert!(ttl > 20_000 && ttl <= 30_000, "{ttl}");
}

#[test]
fn del_deletes() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let key = "{t:p0}:sending:r1";
    let _: () = redis::cmd("SET").arg(key).arg("x").query(&mut c).unwrap();
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT, key],
        &["1", "2", &id, "1", "del", "3"],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(1)]));
    let exists: i64 = redis::cmd("EXISTS").arg(key).query(&mut c).unwrap();
    assert_eq!(exists, 0);
}

#[test]
fn pub_publishes_each_distinct_message_once() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let mut subscriber = redis.connection();
    let mut pubsub = subscriber.as_pubsub();
    pubsub.subscribe("{t}:notify").unwrap();
    pubsub
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let id = setup(&mut c);
    let second: String = redis::cmd("XADD")
        .arg(INPUT)
        .arg("*")
        .arg("f")
        .arg("v")
        .query(&mut c)
        .unwrap();
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("me")
        .arg("STREAMS")
        .arg(INPUT)
        .arg(">")
        .query(&mut c)
        .unwrap();
    // Two entries ask for the same message: it goes out once.
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT],
        &[
            "2",
            "2",
            &id,
            "1",
            "pub",
            "{t}:notify",
            "c1",
            "2",
            &second,
            "1",
            "pub",
            "{t}:notify",
            "c1",
        ],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(1), Value::Int(1)]));
    let message = pubsub.get_message().expect("one message");
    assert_eq!(message.get_payload::<String>().unwrap(), "c1");
    assert!(pubsub.get_message().is_err(), "published only once");
}

#[test]
fn nothing_is_written_when_xack_acknowledged_nothing() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let _: i64 = redis::cmd("XACK")
        .arg(INPUT)
        .arg("g")
        .arg(&id)
        .query(&mut c)
        .unwrap();
    let (out, key, gone) = ("{t:p0}:q", "{t:p0}:sent:r1", "{t:p0}:sending:r1");
    let _: () = redis::cmd("SET").arg(gone).arg("x").query(&mut c).unwrap();
    let reply = ack(
        &mut c,
        "me",
        &[OWNER, INPUT, out, key, gone],
        &[
            "1", "2", &id, "3", "add", "3", "0", "60000", "1", "a", "1", "set", "4", "v", "1000",
            "del", "5",
        ],
    );
    assert_eq!(reply, Value::Array(vec![Value::Int(0)]));
    assert_eq!(xlen(&mut c, out), 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(key)
        .arg(gone)
        .query(&mut c)
        .unwrap();
    assert_eq!(exists, 1, "no set; the del did not happen either");
}

#[test]
fn nothing_at_all_when_the_owner_key_is_not_ours() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let out = "{t:p0}:q";
    let args = ["1", "2", &id, "1", "add", "3", "0", "0", "1", "a", "1"];
    let _: () = redis::cmd("SET")
        .arg(OWNER)
        .arg("other")
        .query(&mut c)
        .unwrap();
    let reply = ack(&mut c, "me", &[OWNER, INPUT, out], &args);
    assert!(
        matches!(&reply, Value::BulkString(b) if b == b"lost")
            || matches!(&reply, Value::SimpleString(s) if s == "lost"),
        "{reply:?}"
    );
    let _: () = redis::cmd("DEL").arg(OWNER).query(&mut c).unwrap();
    let reply = ack(&mut c, "me", &[OWNER, INPUT, out], &args);
    assert!(
        matches!(&reply, Value::BulkString(b) if b == b"lost")
            || matches!(&reply, Value::SimpleString(s) if s == "lost"),
        "no owner at all: {reply:?}"
    );
    assert_eq!(pending(&mut c), 1, "not acknowledged");
    assert_eq!(xlen(&mut c, out), 0, "not written");
}

#[test]
fn a_lease_is_renewed_and_released_only_by_its_holder() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let key = "{t}:lease";
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("me")
        .arg("PX")
        .arg(1000)
        .query(&mut c)
        .unwrap();
    let call = |c: &mut Connection, holder: &str, ttl: u64| -> i64 {
        LEASE.key(key).arg(holder).arg(ttl).invoke(c).unwrap()
    };
    assert_eq!(call(&mut c, "other", 60_000), 0);
    assert!(pttl(&mut c, key) <= 1000, "not renewed by another");
    assert_eq!(call(&mut c, "me", 60_000), 1);
    assert!(pttl(&mut c, key) > 50_000, "renewed by its holder");
    assert_eq!(call(&mut c, "other", 0), 0);
    let holder: Option<String> = redis::cmd("GET").arg(key).query(&mut c).unwrap();
    assert_eq!(holder.as_deref(), Some("me"), "not released by another");
    assert_eq!(call(&mut c, "me", 0), 1);
    let holder: Option<String> = redis::cmd("GET").arg(key).query(&mut c).unwrap();
    assert_eq!(holder, None, "released by its holder");
    assert_eq!(call(&mut c, "me", 60_000), 0, "a lease no one holds");
}

#[test]
fn members_join_expire_and_leave() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let key = "{t}:members:g";
    let announce = |c: &mut Connection, me: &str, ttl: u64| -> Vec<String> {
        // Listed by expiry; the runner sorts them by name itself.
        let mut members: Vec<String> = MEMBERS.key(key).arg(me).arg(ttl).invoke(c).unwrap();
        members.sort();
        members
    };
    // A membership of 50 ms runs out; a later announcement drops it.
    assert_eq!(announce(&mut c, "c", 50), vec!["c"]);
    assert_eq!(announce(&mut c, "b", 60_000), vec!["b", "c"]);
    assert_eq!(announce(&mut c, "a", 60_000), vec!["a", "b", "c"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let members = announce(&mut c, "a", 60_000);
        if members == vec!["a", "b"] {
            break;
        }
        assert_eq!(members, vec!["a", "b", "c"]);
        assert!(std::time::Instant::now() < deadline, "c never expired");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(announce(&mut c, "b", 0), vec!["a"], "b left");
    let ttl = pttl(&mut c, key);
    assert!(ttl > 0, "the set itself expires: {ttl}");
}

#[test]
fn retire_removes_a_consumer_only_without_pending_entries() {
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let id = setup(&mut c);
    let retire =
        |c: &mut Connection| -> i64 { RETIRE.key(INPUT).arg("g").arg("me").invoke(c).unwrap() };
    assert_eq!(retire(&mut c), -1, "an entry is pending");
    let _: i64 = redis::cmd("XACK")
        .arg(INPUT)
        .arg("g")
        .arg(&id)
        .query(&mut c)
        .unwrap();
    assert_eq!(retire(&mut c), 0, "removed, with nothing pending");
}
