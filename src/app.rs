//! The application: binding, serving and graceful shutdown. Handlers and their state live in
//! [`crate::http`].
use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::http::{self, AppState, Operation};

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    router: Router,
    operations: Vec<Operation>,
    /// The keyless `/metrics` address and its router, when `metrics_listen` is set.
    metrics: Option<(TcpListener, Router)>,
}

impl Application {
    /// Bind `settings.listen` (port 0 picks a free port) and build the router.
    pub async fn build(settings: Settings, db: PgPool) -> anyhow::Result<Self> {
        // Custom backbones run in sandboxed children of this binary (serving, inspection).
        crate::backbone::script_host::configure(crate::backbone::script_host::HostConfig {
            exe: settings.ingest.media_worker_exe.clone(),
            ..Default::default()
        });
        if settings.tenant_backbones {
            // Tenants' code is only accepted where the sandbox demonstrably holds.
            let (exe, dir) = (
                settings.ingest.media_worker_exe.clone(),
                settings.data_dir.clone(),
            );
            let verdict = tokio::task::spawn_blocking(move || crate::sandbox::verify(&exe, &dir))
                .await?
                .context("VIDTUNE_TENANT_BACKBONES needs the sandbox (see `vidtune doctor`)")?;
            tracing::info!(sandbox = %verdict, "tenant keys may register TorchScript backbones");
        }
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let metrics_listener = match settings.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?,
            ),
            None => None,
        };
        let state = AppState::new(settings, db);
        // One LISTEN connection for every job event stream of this process.
        let (events, db) = (state.events.clone(), state.db.clone());
        tokio::spawn(async move { events.run(db).await });
        // Batch predictions a previous process left running are taken over.
        tokio::spawn(state.batches.clone().rescue());
        // Uploads a previous process left unfinished; the server answers meanwhile.
        let (db, data_dir, ingest) = (
            state.db.clone(),
            state.settings.data_dir.clone(),
            state.ingest.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::ingest::resume(&db, &data_dir, &ingest).await {
                tracing::warn!(error.cause_chain = ?e, "could not resume unfinished uploads");
            }
        });
        // Deletions a previous process left pending, then files no record refers to.
        let (db, data, grace) = (
            state.db.clone(),
            state.data.clone(),
            state.settings.orphan_grace,
        );
        tokio::spawn(async move {
            if let Err(e) = crate::retention::at_start(&db, &data, grace).await {
                tracing::warn!(error.cause_chain = ?e, "could not tidy the data directory");
            }
        });
        let (router, operations) = http::router(state.clone(), &state.settings);
        let metrics = metrics_listener.map(|l| (l, http::metrics_router(state.clone())));
        Ok(Self {
            listener,
            router,
            operations,
            metrics,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// The address serving `/metrics` without a key, when one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("bound listener"))
    }

    /// The `/v1` operations the router serves.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// Serve until `shutdown` completes, then finish in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "vidtune listening");
        let Some((metrics_listener, metrics_router)) = self.metrics else {
            return axum::serve(
                self.listener,
                self.router
                    .into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP");
        };
        tracing::info!(addr = %metrics_listener.local_addr()?, "serving /metrics without a key");
        // One shutdown signal, seen by both servers.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also ends serving.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let api = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));
        let api = async { api.await.context("serving HTTP") };
        let metrics =
            axum::serve(metrics_listener, metrics_router).with_graceful_shutdown(stopped(stop_rx));
        let metrics = async { metrics.await.context("serving /metrics") };
        // Either one failing ends both, as a lone server would end.
        tokio::try_join!(api, metrics)?;
        Ok(())
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
