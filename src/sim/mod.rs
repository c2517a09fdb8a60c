//! An in-memory Leaf simulator: a test double of Leaf's API (`leaf/LEAF-API.md`) for
//! integration tests, `credsync dev`, `credsync leaf-sim` and benchmarks. It owns nothing of
//! credsync's own state and must never be used as storage: it only imitates the external
//! service, including its faults (set over `/__sim/`).
//!
//! - [`SimServer`]: start on a listener, read its address, stop.
//! - `leaf_routes`: Leaf's routes; `gate`: auth, faults, request log in front of them.
//! - `admin`: the `/__sim/` routes; `alerts`: signed webhook deliveries.
//! - `state`: the shared state; `json`: Leaf's JSON and time formats; `providers`: the table.

mod admin;
mod alerts;
mod gate;
mod json;
mod leaf_routes;
mod providers;
mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::{App, HttpServer, dev::ServerHandle, middleware::from_fn, web};
use anyhow::Context as _;

use state::SimState;

/// Largest request body the simulator reads (admin event batches can be big).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How the simulator behaves.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Lifetime of the `id_token`s it issues (default one hour); settable later with
    /// `PUT /__sim/config`.
    pub token_ttl: Duration,
    /// When set, `/api/authenticate` requires exactly this username...
    pub username: Option<String>,
    /// ...and this password (plain: this is a test double).
    pub password: Option<String>,
    /// actix workers (default 1).
    pub workers: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            token_ttl: Duration::from_secs(3600),
            username: None,
            password: None,
            workers: 1,
        }
    }
}

/// A running simulator.
pub struct SimServer {
    addr: SocketAddr,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for SimServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimServer {
    /// Serves on `listener` from actix workers, the server future spawned onto the current
    /// tokio runtime; returns at once. Must be called within a tokio runtime.
    pub fn start(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimServer> {
        let addr = listener.local_addr()?;
        let workers = opts.workers.max(1);
        let state = web::Data::new(SimState::new(opts)?);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
                .service(web::scope("/__sim").configure(admin::configure))
                .service(
                    web::scope("")
                        .wrap(from_fn(gate::gate))
                        .configure(leaf_routes::configure)
                        .default_service(web::to(leaf_routes::not_found)),
                )
        })
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        Ok(SimServer { addr, handle, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (loopback when bound to an unspecified address).
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            match self.addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            }
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Stops gracefully (in-flight requests get up to one second).
    pub async fn stop(self) {
        self.handle.stop(true).await;
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "leaf-sim stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "leaf-sim task failed"),
        }
    }
}

/// For `credsync leaf-sim`: serve on `listen` until Ctrl-C or SIGTERM.
pub async fn run_forever(listen: &str, opts: SimOptions) -> anyhow::Result<()> {
    // A bad or busy address is the operator's to fix: exit code 2, naming the option.
    let listener = TcpListener::bind(listen).map_err(|e| {
        crate::config::ConfigError::new("--listen", format!("cannot listen on {listen}: {e}"))
    })?;
    let server = SimServer::start(listener, opts).context("cannot start the Leaf simulator")?;
    tracing::info!(url = %server.base_url(), "Leaf simulator listening");
    shutdown_signal().await;
    tracing::info!("Leaf simulator stopping");
    server.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
