//! A throwaway Redis Cluster for tests: three masters on loopback (and, with
//! [`RedisCluster::with_replicas`], one replica each), joined by
//! `redis-cli --cluster create`. Every node is a [`RedisServer`] of its own,
//! with its own port, cluster-bus port and folder, so it is stopped (and its
//! folder removed) on drop, and its log printed if the test failed.

use super::{free_port, RedisServer, Security};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Hash slots of a Redis Cluster; a ready cluster has every one served.
const SLOTS: u16 = 16384;

/// Masters of every test cluster.
const MASTERS: usize = 3;

/// How long a node may miss pings before the others mark it failed (and a
/// replica of a failed master takes over): short, so failover tests are quick.
const NODE_TIMEOUT_MS: &str = "2000";

pub struct RedisCluster {
    /// Every node, in the order they were started and given to `redis-cli`.
    nodes: Vec<RedisServer>,
    /// Ports of the nodes [`RedisCluster::kill_master_of_slot`] killed.
    killed: Vec<u16>,
}

/// One line of `CLUSTER NODES`: a node as another node sees it.
struct NodeView {
    port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, …
    flags: Vec<String>,
    /// The slot ranges it serves, both ends included.
    slots: Vec<(u16, u16)>,
}

impl NodeView {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| first <= slot && slot <= last)
    }
}

impl RedisCluster {
    /// Start three masters, no replicas, serving every slot.
    pub fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Start three masters with one replica each (six nodes), every replica
    /// in sync, so a killed master is replaced by its replica.
    pub fn with_replicas() -> Self {
        Self::start_with_replicas(1)
    }

    fn start_with_replicas(replicas: usize) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(replicas) {
                Ok(cluster) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!(
            "could not start a Redis Cluster (are redis-server and redis-cli installed? \
             scripts/test installs them): {last_error}"
        );
    }

    /// Start the nodes, join them and wait for the cluster to serve every
    /// slot; on an error the nodes started so far are dropped (stopped).
    fn try_start(replicas: usize) -> Result<Self, String> {
        let mut taken = Vec::new();
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            killed: Vec::new(),
        };
        for _ in 0..MASTERS * (1 + replicas) {
            cluster.nodes.push(Self::start_node(&mut taken)?);
        }
        cluster.create(replicas, Duration::from_secs(30))?;
        cluster.wait_state_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// A free port given to no other node of this cluster.
    fn fresh_port(taken: &mut Vec<u16>) -> u16 {
        loop {
            let port = free_port();
            if !taken.contains(&port) {
                taken.push(port);
                return port;
            }
        }
    }

    /// Start one empty cluster node. Its bus port is a free port of its own
    /// (`--cluster-port`), not the default port + 10000, which may be taken
    /// or, for a port above 55535, not exist.
    fn start_node(taken: &mut Vec<u16>) -> Result<RedisServer, String> {
        let port = Self::fresh_port(taken);
        let bus_port = Self::fresh_port(taken);
        let dir = std::env::temp_dir().join(format!(
            "botline-redis-cluster-{}-{port}",
            std::process::id()
        ));
        // A nodes.conf left from an earlier run would make it rejoin that cluster.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis folder");
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &dir.join("nodes.conf").display().to_string(),
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
            "--cluster-port",
            &bus_port.to_string(),
            // A replica's first sync starts at once, not after the default 5 s
            // a master waits for more replicas to share one transfer.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        let child = match RedisServer::spawn(port, &dir, &extra, false) {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("redis-server: {error}"));
            }
        };
        let mut server = RedisServer {
            child,
            port,
            dir,
            extra,
            security: Security::default(),
        };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    /// Where `redis-cli --cluster create` wrote what it said.
    fn create_log(&self) -> PathBuf {
        self.nodes[0].dir().join("cluster-create.log")
    }

    /// `redis-cli --cluster create` every node, `replicas` replicas per
    /// master, without asking (`--cluster-yes`); it returns once every node
    /// knows every other.
    fn create(&self, replicas: usize, within: Duration) -> Result<(), String> {
        let output = || std::fs::read_to_string(self.create_log()).unwrap_or_default();
        let log = std::fs::File::create(self.create_log())
            .map_err(|error| format!("redis-cli log: {error}"))?;
        let log_too = log
            .try_clone()
            .map_err(|error| format!("redis-cli log: {error}"))?;
        let mut command = Command::new("redis-cli");
        command.args(["--cluster", "create"]);
        for node in &self.nodes {
            command.arg(format!("127.0.0.1:{}", node.port()));
        }
        let mut child = command
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .map_err(|error| format!("redis-cli: {error}"))?;
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "redis-cli --cluster create exited: {status}; it said: {}",
                        output()
                    ))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "redis-cli --cluster create did not finish within {within:?}; it said: {}",
                        output()
                    ));
                }
                Err(error) => return Err(format!("redis-cli: {error}")),
            }
        }
    }

    /// The nodes not killed.
    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes
            .iter()
            .filter(|node| !self.killed.contains(&node.port()))
    }

    /// A connection to `node` that gives up after a second, so a node that
    /// hangs fails a poll instead of the test.
    fn connect(node: &RedisServer) -> Result<redis::Connection, String> {
        let within = Duration::from_secs(1);
        let connection = node
            .try_client()
            .and_then(|client| client.get_connection_with_timeout(within))
            .map_err(|error| format!("node {}: {error}", node.port()))?;
        connection
            .set_read_timeout(Some(within))
            .map_err(|error| format!("node {}: {error}", node.port()))?;
        Ok(connection)
    }

    /// `command` on `node`, as text (`CLUSTER INFO`, `CLUSTER NODES`, `INFO …`).
    fn query_text(node: &RedisServer, command: &[&str]) -> Result<String, String> {
        let mut connection = Self::connect(node)?;
        redis::cmd(command[0])
            .arg(&command[1..])
            .query(&mut connection)
            .map_err(|error| format!("node {} {command:?}: {error}", node.port()))
    }

    /// `CLUSTER NODES` on `node`, parsed.
    fn nodes_seen_by(node: &RedisServer) -> Result<Vec<NodeView>, String> {
        let text = Self::query_text(node, &["CLUSTER", "NODES"])?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                parse_node_line(line)
                    .ok_or_else(|| format!("node {}: odd CLUSTER NODES line {line:?}", node.port()))
            })
            .collect()
    }

    /// What the first running node that answers sees of the cluster.
    fn view(&self) -> Vec<NodeView> {
        let mut errors = Vec::new();
        for node in self.running() {
            match Self::nodes_seen_by(node) {
                Ok(view) => return view,
                Err(error) => errors.push(error),
            }
        }
        panic!("no cluster node answers CLUSTER NODES: {errors:?}");
    }

    /// Why the cluster is not ready yet, or nothing: every running node
    /// says `cluster_state:ok`, knows every node, sees all 16384 slots
    /// served by three running masters none of which it thinks failed, and
    /// every other running node as a replica; and every running replica's
    /// link to its master is up.
    fn not_ready(&self) -> Option<String> {
        for node in self.running() {
            let info = match Self::query_text(node, &["CLUSTER", "INFO"]) {
                Ok(info) => info,
                Err(error) => return Some(error),
            };
            let wanted = [
                ("cluster_state", "ok".to_string()),
                ("cluster_slots_assigned", SLOTS.to_string()),
                ("cluster_slots_ok", SLOTS.to_string()),
                ("cluster_known_nodes", self.nodes.len().to_string()),
            ];
            for (name, value) in wanted {
                if info_field(&info, name) != Some(value.as_str()) {
                    return Some(format!(
                        "node {} has {name}:{} (not {value})",
                        node.port(),
                        info_field(&info, name).unwrap_or("none")
                    ));
                }
            }
            let view = match Self::nodes_seen_by(node) {
                Ok(view) => view,
                Err(error) => return Some(error),
            };
            for seen in view.iter().filter(|seen| !seen.slots.is_empty()) {
                if self.killed.contains(&seen.port)
                    || !self.nodes.iter().any(|n| n.port() == seen.port)
                {
                    return Some(format!(
                        "node {} sees slots served by stopped node {}",
                        node.port(),
                        seen.port
                    ));
                }
                if seen.has_flag("fail") || seen.has_flag("fail?") {
                    return Some(format!(
                        "node {} thinks node {} (serving slots) failed",
                        node.port(),
                        seen.port
                    ));
                }
            }
            // `redis-cli` makes the replicas replicas last; until every node
            // heard, one sees them as masters without slots.
            let serving = view.iter().filter(|seen| !seen.slots.is_empty()).count();
            if serving != MASTERS {
                return Some(format!(
                    "node {} sees {serving} masters serving slots, not {MASTERS}",
                    node.port()
                ));
            }
            let unsettled = view.iter().find(|seen| {
                !self.killed.contains(&seen.port)
                    && seen.slots.is_empty()
                    && !seen.has_flag("slave")
            });
            if let Some(seen) = unsettled {
                return Some(format!(
                    "node {} sees node {} neither serving slots nor a replica",
                    node.port(),
                    seen.port
                ));
            }
            let is_replica = view
                .iter()
                .any(|seen| seen.has_flag("myself") && seen.has_flag("slave"));
            if is_replica {
                let replication = match Self::query_text(node, &["INFO", "replication"]) {
                    Ok(replication) => replication,
                    Err(error) => return Some(error),
                };
                if info_field(&replication, "master_link_status") != Some("up") {
                    return Some(format!("replica {} is not in sync yet", node.port()));
                }
            }
        }
        None
    }

    /// Wait until the cluster is ready (see `not_ready`), polling.
    fn wait_state_ok(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let Some(why) = self.not_ready() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(format!("Redis Cluster not ready within {within:?}: {why}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until every running node says `cluster_state:ok`, sees all
    /// slots served by three running masters it does not think failed and
    /// the other nodes as their replicas, and every replica is in sync;
    /// after [`RedisCluster::kill_master_of_slot`], that is once a replica
    /// took over the killed master's slots.
    pub fn wait_ok(&self, within: Duration) {
        if let Err(error) = self.wait_state_ok(within) {
            panic!("{error}");
        }
    }

    /// Wait until every replica has all its master wrote (its replication
    /// offset is its master's), so a master killed now loses nothing.
    pub fn wait_replicated(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut behind = None;
            for node in self.running() {
                let replication = Self::query_text(node, &["INFO", "replication"])
                    .unwrap_or_else(|error| panic!("{error}"));
                if info_field(&replication, "role") != Some("master") {
                    continue;
                }
                let offset = info_field(&replication, "master_repl_offset").unwrap_or("0");
                // slave0:ip=127.0.0.1,port=…,state=online,offset=…,lag=0
                for (name, value) in replication.lines().filter_map(|line| line.split_once(':')) {
                    let numbered = name
                        .strip_prefix("slave")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                    if !numbered {
                        continue;
                    }
                    let replica_offset = value
                        .split(',')
                        .find_map(|pair| pair.strip_prefix("offset="));
                    if replica_offset != Some(offset) {
                        behind = Some(format!(
                            "master {} at offset {offset}, its replica at {value}",
                            node.port()
                        ));
                    }
                }
            }
            let Some(why) = behind else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "replicas not caught up within {within:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port of the master serving `slot` (0..16384), as a running node sees it.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|seen| seen.has_flag("master") && seen.serves(slot))
            .map(|seen| seen.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// `kill -9` the master serving `slot` and return its port; its folder
    /// (and log) stay until the cluster is dropped. With replicas, one takes
    /// over after the node timeout: [`RedisCluster::wait_ok`] waits for that.
    pub fn kill_master_of_slot(&mut self, slot: u16) -> u16 {
        let port = self.master_of_slot(slot);
        self.nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .expect("the master is one of the nodes")
            .kill9();
        self.killed.push(port);
        port
    }

    /// The ports of every node, in the order they were started (killed ones too).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port()).collect()
    }

    /// The node on `port`, to connect to it alone or read its log.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// `redis://127.0.0.1:<port>` of one running node: enough for a cluster
    /// client to find all the others.
    pub fn url(&self) -> String {
        self.running().next().expect("a running cluster node").url()
    }

    /// `redis://127.0.0.1:<port>` of every master serving slots now (a
    /// promoted replica, after a failover, not the killed master).
    pub fn urls(&self) -> Vec<String> {
        self.view()
            .iter()
            .filter(|seen| !seen.slots.is_empty() && !self.killed.contains(&seen.port))
            .map(|seen| self.node(seen.port).url())
            .collect()
    }

    /// The environment the binaries need to use this cluster:
    /// `BOTLINE_REDIS_URL=redis+cluster://` and every running node.
    pub fn env(&self) -> Vec<(String, String)> {
        let nodes: Vec<String> = self
            .running()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        vec![(
            "BOTLINE_REDIS_URL".to_string(),
            format!("redis+cluster://{}/", nodes.join(",")),
        )]
    }

    /// Stop every node and remove its folder (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Each node prints its own log as it drops, after this.
        if std::thread::panicking() && !self.nodes.is_empty() {
            eprintln!(
                "--- Redis Cluster on ports {:?} (killed: {:?}); redis-cli --cluster create said ---\n{}",
                self.ports(),
                self.killed,
                std::fs::read_to_string(self.create_log()).unwrap_or_default()
            );
        }
    }
}

/// The value of `name:value` in `INFO`-like text.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch>
/// <link> <slot> <slot> …`, each slot `n` or `first-last` (`[…]` entries,
/// slots being moved, are left out).
fn parse_node_line(line: &str) -> Option<NodeView> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    let address = fields[1].split(['@', ',']).next()?;
    let port = address.rsplit(':').next()?.parse().ok()?;
    let flags = fields[2].split(',').map(str::to_string).collect();
    let mut slots = Vec::new();
    for range in fields[8..].iter().filter(|range| !range.starts_with('[')) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        slots.push((first.parse().ok()?, last.parse().ok()?));
    }
    Some(NodeView { port, flags, slots })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes_lines() {
        let view = parse_node_line(
            "b1f2 127.0.0.1:31002@36002 myself,master - 0 1796685541845 2 connected 0-5460 5462 [5463->-04dc]",
        )
        .expect("a node line");
        assert_eq!(view.port, 31002);
        assert!(view.has_flag("myself") && view.has_flag("master"));
        assert_eq!(view.slots, vec![(0, 5460), (5462, 5462)]);
        assert!(view.serves(5460) && view.serves(5462) && !view.serves(5461));

        let replica = parse_node_line(
            "04dc 127.0.0.1:31003@36003,host slave b1f2 0 1796685541644 3 connected",
        )
        .expect("a replica line");
        assert_eq!(replica.port, 31003);
        assert!(replica.slots.is_empty() && replica.has_flag("slave"));
        assert!(parse_node_line("garbage").is_none());
        assert_eq!(
            info_field("a:1\r\ncluster_state:ok\r\n", "cluster_state"),
            Some("ok")
        );
    }
}
