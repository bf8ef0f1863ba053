//! Wires the configured pieces into a running gateway: listeners, the tower stack in front of
//! the upstream, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::auth::namespace_ids::NamespaceIds;
use crate::auth::{AuthLayer, Authorizer};
use crate::budget::ProcessBudget;
use crate::codec::PayloadCodec;
use crate::codec_server::CodecServer;
use crate::config::{Config, ConfigError};
use crate::drain::DrainLayer;
use crate::grpc::layer::HandlerLayer;
use crate::ingress::Ingress;
use crate::observe::ObserveLayer;
use crate::rewrite::{Pipeline, RewriteLayer};
use crate::server::{self, ServerSettings};
use crate::server_limits::ServerLimits;
use crate::storage::Storage;
use crate::upstream::{RouteLayer, Router};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {key} = {addr}: {source}")]
    Bind {
        /// The config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A gateway whose listeners are bound and that is ready to serve.
pub struct Gateway {
    proxy_listener: TcpListener,
    admin_listener: Option<TcpListener>,
    upstream: Router,
    rewrite: Option<RewriteLayer>,
    auth: Option<AuthLayer>,
    ingress: Option<Ingress>,
    codec_server: Option<(TcpListener, CodecServer)>,
    settings: ServerSettings,
    readiness: Readiness,
    admin_settings: admin::AdminSettings,
}

/// Loads the configuration file at `path` (the embedded defaults when `None`) with its
/// environment overrides, validated as a whole: [`Config::load_checked`] with the storage
/// drivers' settings checked by [`crate::storage::check_driver`]. Every command that reads
/// the configuration (start, `check-config`, `keys audit`, the key reload) loads it here.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    Config::load_checked(path, &crate::storage::check_driver)
}

/// What `check-config` found: the configuration loads as start would load it.
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    /// The effective policy per namespace (first entry: the default).
    pub policies: Vec<crate::codec::EffectivePolicy>,
    /// Whether the rewrite layer would run (some namespace encrypts, compresses or offloads).
    pub rewrites: bool,
    /// Whether start would generate a development key (none configured, none on disk yet).
    pub would_generate_dev_key: bool,
}

/// Loads everything start loads — key files and variables, certificates, storage drivers,
/// codec endpoint tokens and JWKS — without binding a listener or writing a development key.
pub async fn check(config: &Config) -> Result<CheckReport, StartError> {
    refuse_unsupported(config)?;
    Router::from_config(config)?;
    crate::tls::TlsAcceptor::from_config(&config.proxy.tls)?;
    if let Some(auth) = &config.proxy.auth {
        Authorizer::from_config(auth, |var| std::env::var(var).ok())?;
    }
    let storage = Storage::from_config(config).await?;
    let dev_key = &config.encryption.dev_key_file;
    let would_generate_dev_key = config.encryption.keys.is_empty() && !dev_key.exists();
    let codec = if would_generate_dev_key {
        // Load with a throwaway development key so the policy can be shown; start writes the
        // real one.
        let mut probe = config.clone();
        probe.encryption.dev_key_file =
            std::env::temp_dir().join(format!("pgw-check-{}.key", std::process::id()));
        let codec = PayloadCodec::from_config(&probe);
        let _ = std::fs::remove_file(&probe.encryption.dev_key_file);
        codec?
    } else {
        PayloadCodec::from_config(config)?
    };
    let rewrites = codec.is_active_anywhere() || storage.is_some();
    if config.codec_server.enabled {
        CodecServer::from_config(&config.codec_server, None)?;
    }
    Ok(CheckReport {
        policies: codec.effective_policies(),
        rewrites,
        would_generate_dev_key,
    })
}

/// Signals every listener to stop when set to `true`.
pub type ShutdownSender = watch::Sender<bool>;

impl Gateway {
    /// Validates what this build supports, builds the stack and binds the listeners.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        crate::metrics::install_telemetry();
        refuse_unsupported(config)?;
        let upstream = Router::from_config(config)?;
        let storage = Storage::from_config(config).await?.map(Arc::new);
        // The policy is per namespace: the rewrite layer exists whenever any namespace needs
        // any stage (a namespace that alone turns encryption on must not be forwarded as is).
        let codec = Arc::new(PayloadCodec::from_config(config)?);
        let process_budget = ProcessBudget::with_response_send_timeout(
            config.proxy.max_inflight_bytes,
            Duration::from_millis(config.proxy.response_send_timeout_ms),
        );
        crate::search_attributes::check_at_start(config, &codec, &upstream).await?;
        let search =
            crate::search_attributes::SearchAttributeGuard::from_config(config, codec.clone())
                .map(Arc::new);
        // Start degraded: key services are probed in the background and reported by
        // `/readyz`; one that is down fails only the payloads that need its key.
        let probe_interval = config.encryption.kms_probe_interval_s;
        codec.watch_key_services((probe_interval > 0).then(|| Duration::from_secs(probe_interval)));
        let (readiness_codec, readiness_storage) = ((*codec).clone(), storage.clone());
        let rewrite = if codec.is_active_anywhere() || storage.is_some() || search.is_some() {
            let observed = Arc::downgrade(&codec);
            crate::metrics::observe_codec(move || {
                observed.upgrade().map(|codec| crate::metrics::CodecCounts {
                    encryptions: codec.encryption_counts(),
                    dek_ages: codec.dek_ages(),
                })
            });
            log_policy(&codec);
            let offloads = storage.is_some();
            let layer = RewriteLayer::new(
                Pipeline::new(codec).with_storage(storage),
                config.proxy.max_message_bytes,
                process_budget.clone(),
            )
            .with_search_attributes(search);
            Some(if offloads {
                layer.with_server_limits(Arc::new(ServerLimits::new(
                    upstream.clone(),
                    config.storage.server_limits.clone(),
                )))
            } else {
                layer
            })
        } else {
            tracing::info!("no namespace encrypts, compresses or offloads: forwarding only");
            None
        };
        let auth = match &config.proxy.auth {
            Some(auth) => {
                let authorizer = Authorizer::from_config(auth, |var| std::env::var(var).ok())?;
                tracing::info!(
                    forward_client_authorization = auth.forward_client_authorization,
                    "proxy.auth: every gRPC request is authenticated and checked against its namespace"
                );
                let namespace_ids = NamespaceIds::new(upstream.clone());
                Some(AuthLayer::new(
                    Arc::new(authorizer),
                    Arc::new(namespace_ids),
                ))
            }
            None => {
                if !config.proxy.listen.ip().is_loopback() {
                    tracing::warn!(
                        listen = %config.proxy.listen,
                        "no [proxy.auth]: anyone who reaches the gRPC listener may call it for any namespace"
                    );
                }
                None
            }
        };
        // One ingress decides every request's method and namespace whenever anything acts on
        // them; a gateway that only forwards has nothing to decide and streams bodies through.
        // Routing by namespace needs the decision too.
        let ingress = (auth.is_some() || rewrite.is_some() || upstream.is_routing())
            .then(|| Ingress::new(config.proxy.max_message_bytes, process_budget.clone()));
        let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
        let codec_server = if config.codec_server.enabled {
            let pipeline = rewrite.as_ref().map(|r| r.pipeline().clone());
            let server = CodecServer::from_config(&config.codec_server, pipeline)?;
            let listener = bind("codec_server.listen", config.codec_server.listen).await?;
            Some((listener, server))
        } else {
            None
        };
        let admin_listener = if config.admin.enabled {
            Some(bind("admin.listen", config.admin.listen).await?)
        } else {
            None
        };
        Ok(Self {
            proxy_listener,
            admin_listener,
            upstream,
            rewrite,
            auth,
            ingress,
            codec_server,
            settings: ServerSettings {
                shutdown_grace: Duration::from_millis(config.proxy.shutdown_grace_ms),
                tls: crate::tls::TlsAcceptor::from_config(&config.proxy.tls)?,
                first_request_timeout: Duration::from_millis(config.proxy.first_request_timeout_ms),
                connection_limit: server::ConnectionLimit::new(
                    config.proxy.max_connections,
                    "proxy.max_connections",
                ),
                connection_threads: match config.proxy.worker_threads {
                    0 => std::thread::available_parallelism().map_or(1, usize::from),
                    n => n,
                },
                max_connection_age: crate::listener::ConnectionAge::from_millis(
                    config.proxy.max_connection_age_ms,
                    config.proxy.max_connection_age_grace_ms,
                ),
            },
            readiness: Readiness::new(config.proxy.upstream.clone())
                .with_codec(Some(readiness_codec))
                .with_storage(readiness_storage),
            admin_settings: admin::AdminSettings::from_config(&config.admin, &config.proxy),
        })
    }

    /// The payload codec, when encryption or compression is configured: `SIGHUP` reloads its
    /// keys through [`PayloadCodec::reload`].
    pub fn codec(&self) -> Option<Arc<PayloadCodec>> {
        self.rewrite.as_ref().map(|r| r.pipeline().codec().clone())
    }

    /// The payload pipeline the gRPC layer runs, shared with the codec endpoint (`None` when
    /// the gateway only forwards).
    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.rewrite.as_ref().map(|r| r.pipeline())
    }

    /// The codec endpoint's address, when enabled.
    pub fn codec_server_addr(&self) -> Option<SocketAddr> {
        self.codec_server
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("a bound listener has an address"))
    }

    /// The address SDKs connect to (useful when configured with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `shutdown` turns `true`, then drains in-flight RPCs.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let admin = self.admin_listener.map(|listener| {
            tokio::spawn(admin::serve(
                listener,
                self.readiness,
                self.admin_settings,
                stopped(shutdown.clone()),
            ))
        });
        let codec_server = self.codec_server.map(|(listener, server)| {
            tracing::info!(
                listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "codec endpoint ready"
            );
            tokio::spawn(server.serve(
                listener,
                stopped(shutdown.clone()),
                self.settings.shutdown_grace,
            ))
        });
        tracing::info!(
            listen = %self.proxy_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %self.upstream.default_upstream().authority(),
            "gateway ready"
        );
        if self.upstream.is_routing() {
            for (name, address) in self.upstream.describe() {
                tracing::info!(upstream = %name, %address, "routing by namespace: upstream");
            }
        }
        let route = self
            .upstream
            .is_routing()
            .then(|| HandlerLayer(RouteLayer::new(&self.upstream)));
        let (auth, ingress, rewrite, upstream) =
            (self.auth, self.ingress, self.rewrite, self.upstream);
        let drain = shutdown.clone();
        // One stack per connection thread, each with its own upstream pool. Authentication
        // needs only headers, so it runs before the ingress reads a body; authorization and
        // the rewrite act on what the ingress decided.
        let make_service = move || {
            tower::ServiceBuilder::new()
                .layer(ObserveLayer)
                .layer(DrainLayer::new(drain.clone()))
                .option_layer(auth.as_ref().map(|a| HandlerLayer(a.authenticate())))
                .option_layer(ingress.clone().map(HandlerLayer))
                .option_layer(auth.as_ref().map(|a| HandlerLayer(a.authorize())))
                .option_layer(route.clone())
                .option_layer(rewrite.clone().map(HandlerLayer))
                .service(upstream.with_own_pools())
        };
        server::serve(
            self.proxy_listener,
            make_service,
            self.settings,
            stopped(shutdown),
        )
        .await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        if let Some(codec_server) = codec_server {
            let _ = codec_server.await;
        }
    }
}

/// Logs what applies to which namespace, so an exemption is never a surprise.
fn log_policy(codec: &PayloadCodec) {
    for p in codec.effective_policies() {
        let namespace = p.namespace.as_deref().unwrap_or("(default)");
        match &p.encrypt_key {
            Some(key) => {
                tracing::info!(namespace, key = %key, compress = p.compress, "policy: encrypt")
            }
            None => tracing::warn!(
                namespace,
                compress = p.compress,
                "policy: NOT encrypted (exempt by configuration)"
            ),
        }
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

/// Refuses sections this build parses but does not implement yet, instead of ignoring them.
fn refuse_unsupported(_config: &Config) -> Result<(), ConfigError> {
    // Every section is implemented; unsupported storage driver kinds are refused at config
    // load (`load_config`, `storage::DriverSpec::parse`).
    Ok(())
}
