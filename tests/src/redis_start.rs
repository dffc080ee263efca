//! Redis started the way `compose/` and `compose/kubernetes` start it:
//! through `compose/redis/start.sh` (or the ConfigMap's copy of it), which
//! renders the botline ACL with the passwords in its environment and runs
//! `redis-server --include <the ACL>` with the flags it is given. Here it
//! runs the local `redis-server` on a free port of loopback, in a folder of
//! its own (removed on drop, its log printed if the test failed): the
//! deployment's flags come first, then `--port`, `--bind`, `--dir` and
//! `--logfile` of the test's, which win. Health checks and probes (`sh`
//! commands calling `redis-cli`) run against it through a `redis-cli` that
//! always names its port, never the default 6379.

use botline_shared::testing::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ScriptedRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl ScriptedRedis {
    /// `sh script flags…` with only `env` (and `PATH`); panics, with what
    /// the script and Redis said, unless Redis answers within 10 s.
    pub fn start(script: &Path, flags: &[String], env: &[(&str, &str)]) -> Self {
        let mut last_error = String::new();
        // A port found free can be taken before Redis binds it: try again.
        for _ in 0..5 {
            match Self::try_start(script, flags, env) {
                Ok(server) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("{} did not start Redis: {last_error}", script.display());
    }

    /// As [`ScriptedRedis::start`], once: `Err` with what the script and
    /// Redis printed when it exits instead (a refused setting).
    pub fn try_start(
        script: &Path,
        flags: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "botline-scripted-redis-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("redis folder");
        let output = std::fs::File::create(dir.join("start.out")).expect("start.out");
        let child = Command::new("sh")
            .arg(script)
            .args(flags)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RENDERED_ACL", dir.join("rendered-acl.conf"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("start.out"))
            .stderr(output)
            .spawn()
            .expect("sh runs");
        let mut server = ScriptedRedis { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("exited {status}: {}", server.output()));
            }
            if server.answers() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("no answer within 10 s: {}", server.output()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Redis replies, if only to refuse a client that has not logged in.
    fn answers(&self) -> bool {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)) else {
            return false;
        };
        let Ok(mut connection) = client.get_connection() else {
            return false;
        };
        match redis::cmd("PING").query::<redis::Value>(&mut connection) {
            Ok(_) => true,
            Err(error) => error.code().is_some(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ACL file the script wrote.
    pub fn rendered_acl(&self) -> String {
        std::fs::read_to_string(self.dir.join("rendered-acl.conf")).unwrap_or_default()
    }

    /// A connection logged in as `user` (none: not logged in).
    pub fn connect(&self, login: Option<(&str, &str)>) -> redis::RedisResult<redis::Connection> {
        let login = login
            .map(|(user, password)| format!("{user}:{password}@"))
            .unwrap_or_default();
        redis::Client::open(format!("redis://{login}127.0.0.1:{}", self.port))?.get_connection()
    }

    /// Runs `check` (a health check, a probe: `sh` syntax) with only `env`,
    /// its `redis-cli` talking to this server: whether it passed.
    pub fn check_passes(&self, check: &str, env: &[(&str, &str)]) -> bool {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let redis_cli = std::env::split_paths(&path)
            .map(|dir| dir.join("redis-cli"))
            .find(|candidate| candidate.is_file())
            .expect("redis-cli on PATH (scripts/test installs it)");
        let shim_dir = self.dir.join("bin");
        std::fs::create_dir_all(&shim_dir).unwrap();
        let shim = shim_dir.join("redis-cli");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nexec '{}' -h 127.0.0.1 -p {} \"$@\"\n",
                redis_cli.display(),
                self.port
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut search = vec![shim_dir];
        search.extend(std::env::split_paths(&path));
        let output = Command::new("sh")
            .arg("-c")
            .arg(check)
            .env_clear()
            .env("PATH", std::env::join_paths(search).unwrap())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("sh runs");
        output.status.success()
    }

    /// What the script printed and Redis logged.
    pub fn output(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "start.sh said:\n{}\nredis.log:\n{}",
            read("start.out"),
            read("redis.log")
        )
    }
}

impl Drop for ScriptedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Redis started by a script (port {}) ---\n{}",
                self.port,
                self.output()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
