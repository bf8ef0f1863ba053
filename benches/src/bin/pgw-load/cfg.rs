//! The configurations a run measures.

/// A configuration in front of the upstream. The `-tls` ones speak TLS on both hops
/// (client → proxy and proxy → upstream; `direct-tls`: client → upstream); the Temporal dev
/// server upstream is cleartext, so they run against the echo upstream only.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum Cfg {
    /// The upstream itself.
    Direct,
    /// nginx `grpc_pass`.
    Nginx,
    /// The gateway with encryption, compression and storage off.
    GwOff,
    /// `gw-off` plus `[proxy.auth]`: a static bearer token granting the bench's namespace
    /// (every request is read and its namespace checked; no codec).
    GwAuth,
    /// `gw-off` with a second upstream: `[upstreams.second]` (the same upstream's address)
    /// and the bench's namespace bound to it, so every request is read by the ingress and
    /// routed by its namespace (issue 25: routing cost, one upstream against two).
    GwRouted,
    /// The gateway with zstd level 3 + AES-256-GCM.
    GwCodec,
    /// `gw-codec` plus offload to the filesystem driver.
    GwOffload,
    /// The upstream itself, over TLS.
    DirectTls,
    /// nginx `grpc_pass grpcs://`, TLS listener.
    NginxTls,
    /// `gw-off` with `[proxy.tls]` and `[proxy.upstream_tls]`.
    GwOffTls,
    /// `gw-codec` with `[proxy.tls]` and `[proxy.upstream_tls]`.
    GwCodecTls,
}

impl Cfg {
    /// Every configuration, in the order they are measured.
    pub const ALL: [Cfg; 11] = [
        Cfg::Direct,
        Cfg::Nginx,
        Cfg::GwOff,
        Cfg::GwAuth,
        Cfg::GwRouted,
        Cfg::GwCodec,
        Cfg::GwOffload,
        Cfg::DirectTls,
        Cfg::NginxTls,
        Cfg::GwOffTls,
        Cfg::GwCodecTls,
    ];

    /// Name in tables, CSV and `--configs`.
    pub fn label(self) -> &'static str {
        match self {
            Cfg::Direct => "direct",
            Cfg::Nginx => "nginx",
            Cfg::GwOff => "gw-off",
            Cfg::GwAuth => "gw-auth",
            Cfg::GwRouted => "gw-routed",
            Cfg::GwCodec => "gw-codec",
            Cfg::GwOffload => "gw-offload",
            Cfg::DirectTls => "direct-tls",
            Cfg::NginxTls => "nginx-tls",
            Cfg::GwOffTls => "gw-off-tls",
            Cfg::GwCodecTls => "gw-codec-tls",
        }
    }

    /// Description in the memory table.
    pub fn describe(self) -> &'static str {
        match self {
            Cfg::Direct => "(a) upstream directly",
            Cfg::Nginx => "(b) nginx grpc_pass",
            Cfg::GwOff => "(c) gateway, codecs off",
            Cfg::GwAuth => "(c') gateway, codecs off, [proxy.auth] (static token)",
            Cfg::GwRouted => "(c'') gateway, codecs off, two upstreams, routed by namespace",
            Cfg::GwCodec => "(d) gateway, zstd + AES-256-GCM",
            Cfg::GwOffload => "(e) gateway, zstd + AES-GCM + offload (filesystem)",
            Cfg::DirectTls => "(a) upstream directly, TLS",
            Cfg::NginxTls => "(b) nginx grpc_pass, TLS both hops",
            Cfg::GwOffTls => "(c) gateway, codecs off, TLS both hops",
            Cfg::GwCodecTls => "(d) gateway, zstd + AES-256-GCM, TLS both hops",
        }
    }

    /// Line colour in the SVG (the TLS variants are drawn dashed in their plain colour).
    pub fn color(self) -> &'static str {
        match self.plain() {
            Cfg::Nginx => "#2ca02c",
            Cfg::GwOff => "#1f77b4",
            Cfg::GwAuth => "#9467bd",
            Cfg::GwRouted => "#8c564b",
            Cfg::GwCodec => "#ff7f0e",
            Cfg::GwOffload => "#d62728",
            _ => "#888888",
        }
    }

    /// Whether both hops speak TLS.
    pub fn tls(self) -> bool {
        self != self.plain()
    }

    /// The same configuration without TLS.
    pub fn plain(self) -> Cfg {
        match self {
            Cfg::DirectTls => Cfg::Direct,
            Cfg::NginxTls => Cfg::Nginx,
            Cfg::GwOffTls => Cfg::GwOff,
            Cfg::GwCodecTls => Cfg::GwCodec,
            c => c,
        }
    }

    /// The configuration this one's ratios are taken against: `direct`, or `direct-tls`
    /// for the TLS ones.
    pub fn baseline(self) -> Cfg {
        if self.tls() {
            Cfg::DirectTls
        } else {
            Cfg::Direct
        }
    }
}
