//! Throwaway PostgreSQL clusters built from the local PostgreSQL binaries, for `credsync dev`
//! and the integration tests.
//!
//! Owns: finding `initdb` and `postgres`, creating a cluster in a private temporary directory
//! (`initdb -A trust -N`), running the server on a free loopback port with durability turned
//! off, and tearing it down again. When we run as root the server runs as the `postgres` user
//! (PostgreSQL refuses to run as root).
//!
//! Must never: touch a cluster or directory it did not create, or outlive its owner. The server
//! is started under a small shell watchdog that stops it and removes its directory as soon as
//! our end of a pipe closes, which happens on [`Drop`] and also when the owning process dies
//! without running destructors (a test binary's statics are never dropped).

use std::{
    ffi::OsString,
    fs,
    io::{Read, Seek, SeekFrom},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use sqlx::Connection;

/// Environment variable naming the directory that holds `initdb` and `postgres`.
pub const PG_BIN_ENV: &str = "CREDSYNC_PG_BIN";

/// How long the server gets to accept its first connection.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Drop`] waits for the watchdog to stop the server.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting a cluster when the chosen port was taken in the meantime.
const START_ATTEMPTS: usize = 3;

/// The watchdog, run as `sh -c WATCHDOG credsync-pgtemp DIR LOG COMMAND...`.
///
/// It starts COMMAND (the server) in the background with its output appended to LOG, then a
/// background job waits until its stdin (a pipe whose write end only our process holds) reaches
/// end-of-file, asks the server for a fast shutdown (SIGINT), escalates to SIGKILL after ten
/// seconds and removes DIR. The foreground waits for the server, so the shell's exit tells our
/// process that the server is gone. Background jobs of a non-interactive shell get `/dev/null`
/// as stdin, hence the pipe is kept on fd 3.
///
/// [`TempPostgres::stop`] writes the line `keep` into the pipe before closing it: the server is
/// stopped the same way but DIR is kept (for [`TempPostgres::restart`]), and the foreground then
/// also waits for the background job, so that the shell's exit means the stop is complete. A
/// bare end-of-file (our process dropped the pipe or died) removes DIR as before.
const WATCHDOG: &str = r#"
dir=$1; log=$2; shift 2
exec 3<&0
"$@" </dev/null >>"$log" 2>&1 3<&- &
pg=$!
{
  cmd=
  read -r cmd <&3 || :
  if [ "$cmd" = keep ]; then : >"$dir/keep"; fi
  kill -INT "$pg" 2>/dev/null
  if read -r pm <"$dir/data/postmaster.pid" 2>/dev/null && [ "$pm" != "$pg" ]; then
    kill -INT "$pm" 2>/dev/null
  fi
  i=0
  while kill -0 "$pg" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$pg" 2>/dev/null
  if [ "$cmd" != keep ]; then rm -rf "$dir"; fi
} &
guard=$!
exec 3<&-
wait "$pg"
status=$?
if [ -e "$dir/keep" ]; then
  wait "$guard"
  rm -f "$dir/keep"
fi
exit "$status"
"#;

/// A PostgreSQL server in its own temporary directory, reachable at [`TempPostgres::url`] as the
/// superuser `postgres` without a password. Dropping it stops the server and removes the
/// directory; if the owning process dies instead, the watchdog does the same.
///
/// [`TempPostgres::stop`] and [`TempPostgres::restart`] take the server down and bring it back
/// on the same port with the same data (for outage tests). While it is stopped no server runs;
/// the directory is removed on [`Drop`] (but not if the owning process dies in that window).
#[derive(Debug)]
pub struct TempPostgres {
    url: String,
    port: u16,
    dir: PathBuf,
    bin_dir: PathBuf,
    watchdog: Child,
    /// Our end of the watchdog's stdin pipe: closing it stops the server.
    lifeline: Option<ChildStdin>,
}

impl TempPostgres {
    /// Creates a cluster with the local PostgreSQL binaries (see [`find_binaries`]), starts it on
    /// a free port of 127.0.0.1 and waits until it accepts a connection.
    pub async fn start() -> anyhow::Result<TempPostgres> {
        let bin_dir = find_binaries()?;
        let run_as = RunAs::detect()?;
        let mut attempt = 1;
        loop {
            match start_once(&bin_dir, &run_as).await {
                Ok(pg) => return Ok(pg),
                Err(StartError::PortTaken(e)) if attempt < START_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "port taken, starting again on another one");
                    attempt += 1;
                }
                Err(StartError::PortTaken(e) | StartError::Other(e)) => return Err(e),
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory holding the cluster (`data/`), its socket and `postgres.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the PostgreSQL binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Whether the server is running (not stopped with [`TempPostgres::stop`], not exited).
    pub fn is_running(&mut self) -> bool {
        self.lifeline.is_some() && matches!(self.watchdog.try_wait(), Ok(None))
    }

    /// Stops the server (fast shutdown: open connections are terminated) and waits until it is
    /// gone, keeping the data directory and the port for [`TempPostgres::restart`]. Does nothing
    /// when it is already stopped.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut lifeline) = self.lifeline.take() else {
            return Ok(());
        };
        // `keep` tells the watchdog to stop the server without removing the directory; if the
        // write fails the watchdog is gone already, and so is the server.
        let _ = std::io::Write::write_all(&mut lifeline, b"keep\n");
        drop(lifeline);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.watchdog.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Err(e) => return Err(e).context("waiting for the PostgreSQL watchdog"),
                Ok(None) if Instant::now() >= deadline => {
                    bail!("PostgreSQL did not stop within {STOP_TIMEOUT:?}");
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Starts the server again after [`TempPostgres::stop`]: same data directory, same port,
    /// under a new watchdog; waits until it accepts a connection. Does nothing when it runs.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.lifeline.is_some() {
            return Ok(());
        }
        let run_as = RunAs::detect()?;
        let (watchdog, lifeline) = spawn_server(&self.bin_dir, &run_as, &self.dir, self.port)?;
        self.watchdog = watchdog;
        self.lifeline = lifeline;
        match wait_ready(self).await {
            Ok(()) => Ok(()),
            Err(StartError::PortTaken(e) | StartError::Other(e)) => {
                Err(e.context(format!("restarting PostgreSQL on port {}", self.port)))
            }
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog stop the server; its shell exits once it is gone.
        drop(self.lifeline.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.watchdog.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(dir = %self.dir.display(), "throwaway Postgres did not stop in time");
                    let _ = self.watchdog.kill();
                    let _ = self.watchdog.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The directory holding `initdb` and `postgres`: `$CREDSYNC_PG_BIN` if set, else the highest
/// version under `/usr/lib/postgresql/*/bin` (Debian/Ubuntu layout), else the first `PATH`
/// entry with both.
pub fn find_binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        bail!(
            "{PG_BIN_ENV}={} does not contain executable `initdb` and `postgres`",
            dir.display()
        );
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(dir) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_server_binaries(dir))
    {
        return Ok(dir);
    }
    bail!(
        "no PostgreSQL server binaries (`initdb` and `postgres`) found in ${PG_BIN_ENV}, \
         /usr/lib/postgresql/*/bin or PATH: install the PostgreSQL server (Debian/Ubuntu: \
         `apt-get install postgresql`, Fedora: `dnf install postgresql-server`, macOS: \
         `brew install postgresql@15`) or set {PG_BIN_ENV} to the directory holding them"
    )
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "postgres"]
        .iter()
        .all(|name| is_executable(&dir.join(name)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How to run PostgreSQL's programs: directly, or as the `postgres` user when we are root.
#[derive(Debug)]
struct RunAs {
    /// Command prefix switching to the `postgres` user (empty when not root).
    prefix: Vec<OsString>,
    /// Owner to give the temporary directory.
    owner: Option<(u32, u32)>,
}

impl RunAs {
    fn detect() -> anyhow::Result<RunAs> {
        if effective_uid()? != 0 {
            return Ok(RunAs {
                prefix: Vec::new(),
                owner: None,
            });
        }
        let Some(owner) = lookup_user("postgres")? else {
            bail!(
                "running as root, which PostgreSQL refuses, and there is no `postgres` user to \
                 run it as: create one (`useradd --system --user-group postgres`), run as a \
                 non-root user, or set DATABASE_URL to an existing server"
            );
        };
        let prefix: Vec<OsString> = if let Some(setpriv) = find_in_path("setpriv") {
            vec![
                setpriv.into(),
                "--reuid=postgres".into(),
                "--regid=postgres".into(),
                "--init-groups".into(),
            ]
        } else if let Some(runuser) = find_in_path("runuser") {
            vec![runuser.into(), "-u".into(), "postgres".into(), "--".into()]
        } else {
            bail!(
                "running as root, which PostgreSQL refuses, and neither `setpriv` nor `runuser` \
                 (util-linux) is installed to run it as the `postgres` user"
            );
        };
        Ok(RunAs {
            prefix,
            owner: Some(owner),
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        // Predictable messages, and no complaint about a locale the host lacks.
        command.env("LC_ALL", "C").env_remove("PGDATA");
        command
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`), or from
/// `id -u` where there is no `/proc` (macOS).
fn effective_uid() -> anyhow::Result<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        return status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok())
            .ok_or_else(|| anyhow!("no effective uid in /proc/self/status"));
    }
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("running `id -u`")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| anyhow!("`id -u` printed no uid"))
}

/// Uid and gid of a user from `/etc/passwd`.
fn lookup_user(name: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    Ok(passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    }))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

enum StartError {
    /// The server could not bind the port we picked (taken since): worth another attempt.
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Other(e)
    }
}

/// Removes a directory when dropped, unless [`RemoveOnDrop::keep`] was called: covers every
/// early return, and a start-up future dropped half-way.
struct RemoveOnDrop {
    dir: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.dir)
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

async fn start_once(bin_dir: &Path, run_as: &RunAs) -> Result<TempPostgres, StartError> {
    let dir_guard = RemoveOnDrop {
        dir: make_private_dir(run_as)?,
        armed: true,
    };
    let dir = dir_guard.dir.clone();
    let data = dir.join("data");

    let mut initdb = run_as.command(&bin_dir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-A",
            "trust",
            "-N",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null());
    let output = tokio::process::Command::from(initdb)
        .kill_on_drop(true)
        .output()
        .await
        .context("running initdb")?;
    if !output.status.success() {
        return Err(anyhow!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }

    let port = free_port()?;
    let (watchdog, lifeline) = spawn_server(bin_dir, run_as, &dir, port)?;
    // From here on the watchdog, and `TempPostgres`'s Drop, own the directory.
    let mut pg = TempPostgres {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        port,
        dir: dir_guard.keep(),
        bin_dir: bin_dir.to_owned(),
        watchdog,
        lifeline,
    };
    wait_ready(&mut pg).await?;
    Ok(pg)
}

/// Starts the server on `port` under the watchdog; returns the watchdog and our end of its pipe.
fn spawn_server(
    bin_dir: &Path,
    run_as: &RunAs,
    dir: &Path,
    port: u16,
) -> anyhow::Result<(Child, Option<ChildStdin>)> {
    let data = dir.join("data");
    let log = dir.join("postgres.log");
    let mut server = run_as.command(&bin_dir.join("postgres"));
    server
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-p"])
        .arg(port.to_string())
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]);
    let mut watchdog = Command::new("sh");
    watchdog
        .arg("-c")
        .arg(WATCHDOG)
        .arg("credsync-pgtemp")
        .arg(dir)
        .arg(&log)
        .arg(server.get_program())
        .args(server.get_args())
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a terminal's Ctrl-C reaches only us, and we shut it down.
        .process_group(0);
    let mut child = watchdog
        .spawn()
        .context("starting sh for the PostgreSQL server")?;
    let lifeline = child.stdin.take();
    Ok((child, lifeline))
}

/// Waits until the server accepts a connection, or reports why it exited or timed out.
async fn wait_ready(pg: &mut TempPostgres) -> Result<(), StartError> {
    let log = pg.dir.join("postgres.log");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = pg.watchdog.try_wait() {
            let log = log_tail(&log);
            let e = anyhow!("PostgreSQL exited during start-up ({status}): {log}");
            return Err(
                if log.contains("could not bind") || log.contains("already in use") {
                    StartError::PortTaken(e)
                } else {
                    StartError::Other(e)
                },
            );
        }
        match sqlx::PgConnection::connect(&pg.url).await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow!(
                    "PostgreSQL did not accept connections within {READY_TIMEOUT:?} ({e}): {}",
                    log_tail(&log)
                )
                .into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A fresh `0700` directory under the system temporary directory, owned by the user the server
/// will run as.
fn make_private_dir(run_as: &RunAs) -> anyhow::Result<PathBuf> {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!(
        "credsync-pg-{}-{}",
        std::process::id(),
        &suffix[..12]
    ));
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let prepared = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .and_then(|()| match run_as.owner {
            Some((uid, gid)) => std::os::unix::fs::chown(&dir, Some(uid), Some(gid)),
            None => Ok(()),
        })
        .with_context(|| format!("preparing {}", dir.display()));
    if let Err(e) = prepared {
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last few kilobytes of the server log, for error messages.
fn log_tail(log: &Path) -> String {
    const TAIL: u64 = 2048;
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(log) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).trim().to_owned();
    }
    if text.is_empty() {
        format!("(nothing in {})", log.display())
    } else {
        text
    }
}
