//! TLS on the one port, and who a certificate says its holder is.
//!
//! Every certificate of a cluster is signed by the cluster's CA and names its
//! holder in a URI subject alternative name:
//!
//! - a member: `raft-host://CLUSTER/member/ID`;
//! - a client: `raft-host://CLUSTER/client/ROLE/NAME`, ROLE one of `reader`,
//!   `writer`, `admin`.
//!
//! The CA decides both who belongs to the cluster and what a client may do,
//! so members need no table of users kept in step. Both directions are
//! verified: a member accepts only connections with a certificate of the
//! CA, and checks that a peer it dials holds the certificate of a member.
//!
//! The acceptor and the connector are our own (on tokio-rustls) rather than
//! tonic's, so that [`Tls::reload`] swaps the certificates for every new
//! connection without a restart.

use crate::raft::NodeId;
use hyper_util::rt::TokioIo;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::Service;
use tonic::transport::Uri;
use tonic::transport::server::Connected;

/// The URI scheme of the names in our certificates.
const SCHEME: &str = "raft-host://";
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake is done and that wait for the server.
const ACCEPTED_QUEUE: usize = 64;

/// What a client may do, from its certificate. Each role may do what the
/// roles before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientRole {
    /// Reads, status, watch.
    Reader,
    /// And writes.
    Writer,
    /// And deploys, activations, membership changes, leader transfers,
    /// offline and online.
    Admin,
}

impl ClientRole {
    /// The name certificates and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientRole::Reader => "reader",
            ClientRole::Writer => "writer",
            ClientRole::Admin => "admin",
        }
    }

    /// A role from its name.
    pub fn parse(name: &str) -> Option<ClientRole> {
        match name {
            "reader" => Some(ClientRole::Reader),
            "writer" => Some(ClientRole::Writer),
            "admin" => Some(ClientRole::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for ClientRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Member { cluster: String, id: NodeId },
    Client { cluster: String, role: ClientRole, name: String },
}

impl Principal {
    /// The cluster it belongs to.
    pub fn cluster(&self) -> &str {
        match self {
            Principal::Member { cluster, .. } | Principal::Client { cluster, .. } => cluster,
        }
    }

    /// The URI that names it in a certificate.
    pub fn to_uri(&self) -> String {
        match self {
            Principal::Member { cluster, id } => format!("{SCHEME}{}/member/{id}", escape(cluster)),
            Principal::Client { cluster, role, name } => {
                format!("{SCHEME}{}/client/{role}/{}", escape(cluster), escape(name))
            }
        }
    }

    /// The principal a URI names, if it is one of ours and well formed.
    pub fn from_uri(uri: &str) -> Option<Principal> {
        let rest = uri.strip_prefix(SCHEME)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [cluster, "member", id] => {
                let id: NodeId = id.parse().ok().filter(|&id| id > 0)?;
                Some(Principal::Member { cluster: unescape(cluster)?, id })
            }
            [cluster, "client", role, name] => Some(Principal::Client {
                cluster: unescape(cluster)?,
                role: ClientRole::parse(role)?,
                name: unescape(name)?,
            }),
            _ => None,
        }
    }

    /// Who the client certificate of the TLS connection that carried
    /// `request` names.
    pub fn of_request<T>(request: &tonic::Request<T>) -> Result<Principal, String> {
        let certificates = request.peer_certs().ok_or("the connection carries no certificate")?;
        let certificate = certificates.first().ok_or("the connection carries no certificate")?;
        Principal::of_certificate(certificate)
    }

    /// The principal the first certificate of a chain names.
    pub fn of_certificate(der: &[u8]) -> Result<Principal, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, certificate) =
            X509Certificate::from_der(der).map_err(|e| format!("the certificate does not parse: {e}"))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|e| format!("its subject alternative names do not parse: {e}"))?
            .ok_or("it has no subject alternative names")?;
        let mut found = names.value.general_names.iter().filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
            _ => None,
        });
        let uri = found.next().ok_or("it names no raft-host member or client (a raft-host:// URI)")?;
        if found.next().is_some() {
            return Err("it names more than one raft-host member or client".into());
        }
        Principal::from_uri(uri).ok_or_else(|| format!("{uri:?} is not a raft-host member or client"))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Member { cluster, id } => write!(f, "member {id} of cluster {cluster:?}"),
            Principal::Client { cluster, role, name } => write!(f, "{role} client {name:?} of cluster {cluster:?}"),
        }
    }
}

/// Percent-encodes what is not a URI path's plain character.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// The files of one party's TLS setup, in PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate: who is trusted.
    pub ca: PathBuf,
    /// This party's certificate (signed by the CA).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS settings: {0}")]
    Config(#[from] rustls::Error),
    #[error("{path}: {why}")]
    Identity { path: PathBuf, why: String },
}

/// The configurations built from one reading of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    principal: Principal,
}

/// TLS material of one party, reloadable.
pub struct Tls {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("principal", &self.principal()).finish()
    }
}

impl Tls {
    /// Reads the files and builds the server and client configurations.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let loaded = build(&files)?;
        Ok(Tls { files, loaded: RwLock::new(Arc::new(loaded)) })
    }

    /// Reads the files again; new connections use what they hold now,
    /// open ones go on as they are. The new certificate must name the same
    /// party as the old one (a member stays the member it is); a failure
    /// keeps the old material.
    pub fn reload(&self) -> Result<Principal, TlsError> {
        let loaded = build(&self.files)?;
        let (was, is) = (self.principal(), loaded.principal.clone());
        if was != is {
            return Err(TlsError::Identity {
                path: self.files.cert.clone(),
                why: format!("it names {is}, but this party is {was}; keeping the certificate it started with"),
            });
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(is)
    }

    /// Who this party's own certificate names.
    pub fn principal(&self) -> Principal {
        self.current().principal.clone()
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connections accepted on `listener`, each once its handshake is done
    /// (a client with no certificate of the CA never gets past it). Ends when
    /// the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<io::Result<Admitted<TlsStream<TcpStream>>>> {
        let tls = self.clone();
        accept_each(listener, move |tcp, remote| {
            let config = tls.current().server.clone();
            async move {
                let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => Some(stream),
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "refused a connection: TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::info!(%remote, "refused a connection: TLS handshake timed out");
                        None
                    }
                }
            }
        })
    }

    /// Dials servers over TLS as this party, for a tonic channel.
    pub fn connector(self: &Arc<Self>) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }
}

/// Connections a member holds open at once, handshakes included; past it,
/// it stops accepting until one closes (the kernel queues the rest).
const CONNECTIONS_MAX: usize = 4096;

/// Plaintext connections accepted on `listener` (for a member that serves
/// plaintext by the operator's choice), under the same connection bound.
pub fn plaintext_incoming(listener: TcpListener) -> ReceiverStream<io::Result<Admitted<TcpStream>>> {
    accept_each(listener, |tcp, _| async move { Some(tcp) })
}

/// Accepts connections while fewer than [`CONNECTIONS_MAX`] are open and
/// hands each, made ready by `prepare` (a handshake, say; `None` drops
/// it), to the stream, holding a permit until it closes.
fn accept_each<S, F, P>(listener: TcpListener, prepare: P) -> ReceiverStream<io::Result<Admitted<S>>>
where
    S: Send + 'static,
    F: Future<Output = Option<S>> + Send + 'static,
    P: Fn(TcpStream, std::net::SocketAddr) -> F + Send + 'static,
{
    let (accepted, stream) = mpsc::channel(ACCEPTED_QUEUE);
    let open = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = accepted.closed() => return,
                permit = open.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = accepted.closed() => return,
                connection = listener.accept() => match connection {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Small answers must not wait out delayed ACKs (~40 ms).
            let _ = tcp.set_nodelay(true);
            let ready = prepare(tcp, remote);
            let accepted = accepted.clone();
            tokio::spawn(async move {
                if let Some(stream) = ready.await {
                    let _ = accepted.send(Ok(Admitted { stream, _permit: permit })).await;
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

/// An accepted connection, holding its place among the member's open
/// connections until it is dropped.
pub struct Admitted<S> {
    stream: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl<S: Connected> Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

fn read_error(path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), why: why.to_string() }
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| read_error(&files.ca, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(&files.ca, e))?;
    if ca.is_empty() {
        return Err(read_error(&files.ca, "no certificate in it"));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(&files.cert, e))?;
    let own = chain.first().ok_or_else(|| read_error(&files.cert, "no certificate in it"))?;
    let principal =
        Principal::of_certificate(own).map_err(|why| TlsError::Identity { path: files.cert.clone(), why })?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| read_error(&files.key, e))?;
    let mut roots = RootCertStore::empty();
    for certificate in ca {
        roots.add(certificate).map_err(|e| read_error(&files.ca, e))?;
    }
    let roots = Arc::new(roots);
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| read_error(&files.ca, e))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { server: Arc::new(server), client: Arc::new(client), principal })
}

/// Dials `host:port` and makes a TLS session with the server's name
/// verified against its certificate, for tonic's channels.
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<Tls>,
}

impl Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.current().client.clone();
        Box::pin(async move {
            let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {why}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            let name = ServerName::try_from(host.to_string()).map_err(|_| invalid("not a host name or address"))?;
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {host}:{port}: {e}")))?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {host}:{port} failed: {e}")))?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::certs;

    /// A TLS handshake between `client` and `server` over an in-memory pipe.
    async fn handshake(client: &Tls, server: &Tls) -> Result<(), String> {
        let (near, far) = tokio::io::duplex(64 << 10);
        let accept = tokio_rustls::TlsAcceptor::from(server.current().server.clone());
        let connect = tokio_rustls::TlsConnector::from(client.current().client.clone());
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let (accepted, connected) = tokio::join!(accept.accept(far), connect.connect(name, near));
        accepted.map_err(|e| format!("server: {e}"))?;
        connected.map_err(|e| format!("client: {e}"))?;
        Ok(())
    }

    #[test]
    fn a_bundle_of_two_cas_of_one_cluster_trusts_the_certificates_of_both() {
        let (old, new) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        for dir in [old.path(), new.path()] {
            certs::create_ca(dir, "c", 30).expect("CA");
        }
        let client = certs::issue_client(old.path(), "app", ClientRole::Writer, 30).expect("client");
        let member = certs::issue_member(new.path(), 1, &["127.0.0.1".to_string()], 30).expect("member");
        let bundle = new.path().join("both.pem");
        let pem = |dir: &Path| std::fs::read(certs::ca_paths(dir).cert).expect("CA");
        std::fs::write(&bundle, [pem(old.path()), pem(new.path())].concat()).expect("bundle");
        let load = |paths: certs::CertPaths, ca: &Path| {
            Tls::load(TlsFiles { ca: ca.to_path_buf(), cert: paths.cert, key: paths.key }).expect("loads")
        };
        let (client, member) = (load(client, &bundle), load(member, &bundle));
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            handshake(&client, &member).await.expect("each trusts the other's CA through the bundle");
            let only_new = load(certs::client_paths(old.path(), "app"), &certs::ca_paths(new.path()).cert);
            let member_only_new = load(certs::member_paths(new.path(), 1), &certs::ca_paths(new.path()).cert);
            assert!(handshake(&only_new, &member_only_new).await.is_err(), "the old CA's client is refused");
        });
    }

    #[test]
    fn principals_round_trip_through_their_uri() {
        let member = Principal::Member { cluster: "prod eu/1".into(), id: 7 };
        assert_eq!(member.to_uri(), "raft-host://prod%20eu%2F1/member/7");
        assert_eq!(Principal::from_uri(&member.to_uri()), Some(member));
        let client = Principal::Client { cluster: "c".into(), role: ClientRole::Writer, name: "billing/api".into() };
        assert_eq!(Principal::from_uri(&client.to_uri()), Some(client));
        for bad in [
            "https://c/member/1",
            "raft-host://c/member/0",
            "raft-host://c/member/x",
            "raft-host://c/client/root/x",
            "raft-host://c/client/admin",
            "raft-host:///member/1",
            "raft-host://c%ZZ/member/1",
        ] {
            assert_eq!(Principal::from_uri(bad), None, "{bad}");
        }
        assert!(ClientRole::Reader < ClientRole::Writer && ClientRole::Writer < ClientRole::Admin);
    }
}
