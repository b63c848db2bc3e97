//! A cluster's certificates, made without openssl: a CA, member certificates
//! (the member's id, and its host names and addresses as SANs) and client
//! certificates (a name and a role). See [`super::tls`] for what they name.
//!
//! Files in one directory, PEM, private keys readable by their owner only:
//! `ca.pem`/`ca.key`, `member-ID.pem`/`.key`, `client-NAME.pem`/`.key`.

use super::tls::{ClientRole, Principal};
use crate::raft::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// The CA's own name in its certificate, which also says its cluster.
const CA_URI_SUFFIX: &str = "/ca";

/// Why certificates could not be made.
#[derive(Debug, Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} exists already; remove it first to make a new one")]
    Exists { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The files of one certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    fn in_dir(dir: &Path, stem: &str) -> CertPaths {
        CertPaths { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) }
    }
}

/// The files of the CA of `dir`.
pub fn ca_paths(dir: &Path) -> CertPaths {
    CertPaths::in_dir(dir, "ca")
}

/// The files of member `id`'s certificate in `dir`.
pub fn member_paths(dir: &Path, id: NodeId) -> CertPaths {
    CertPaths::in_dir(dir, &format!("member-{id}"))
}

/// The files of client `name`'s certificate in `dir`.
pub fn client_paths(dir: &Path, name: &str) -> CertPaths {
    CertPaths::in_dir(dir, &format!("client-{name}"))
}

/// Creates the CA of cluster `cluster` in `dir` (which it creates), valid
/// for `days`. Refuses to replace an existing CA.
pub fn create_ca(dir: &Path, cluster: &str, days: u32) -> Result<CertPaths, CertError> {
    if cluster.is_empty() {
        return Err(CertError::Invalid("the cluster name is empty".into()));
    }
    let paths = ca_paths(dir);
    refuse_existing(&paths)?;
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("raft-host CA of cluster {cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let uri = Principal::Member { cluster: cluster.to_string(), id: 1 }.to_uri();
    let cluster_uri = uri.strip_suffix("/member/1").unwrap_or(&uri).to_string() + CA_URI_SUFFIX;
    params.subject_alt_names = vec![SanType::URI(cluster_uri.try_into()?)];
    valid_for(&mut params, days);
    let key = KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    write_pair(&paths, &certificate.pem(), &key.serialize_pem())?;
    Ok(paths)
}

/// Issues member `id`'s certificate, for the given host names and addresses
/// (what clients and peers dial it by), signed by the CA in `dir`.
pub fn issue_member(dir: &Path, id: NodeId, hosts: &[String], days: u32) -> Result<CertPaths, CertError> {
    if id == 0 {
        return Err(CertError::Invalid("member ids start at 1".into()));
    }
    if hosts.is_empty() {
        return Err(CertError::Invalid("name at least one host name or address the member is reached at".into()));
    }
    let (issuer, cluster) = load_ca(dir)?;
    let principal = Principal::Member { cluster: cluster.clone(), id };
    let mut names = vec![SanType::URI(principal.to_uri().try_into()?)];
    for host in hosts {
        names.push(match host.parse::<IpAddr>() {
            Ok(address) => SanType::IpAddress(address),
            Err(_) => SanType::DnsName(host.clone().try_into()?),
        });
    }
    let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    issue(&issuer, &member_paths(dir, id), &format!("member {id} of {cluster}"), names, usages, days)
}

/// Issues client `name`'s certificate with `role`, signed by the CA in `dir`.
pub fn issue_client(dir: &Path, name: &str, role: ClientRole, days: u32) -> Result<CertPaths, CertError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(CertError::Invalid(format!("a client name uses letters, digits, '-', '_' and '.', not {name:?}")));
    }
    let (issuer, cluster) = load_ca(dir)?;
    let principal = Principal::Client { cluster: cluster.clone(), role, name: name.to_string() };
    let names = vec![SanType::URI(principal.to_uri().try_into()?)];
    let usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(&issuer, &client_paths(dir, name), &format!("{role} client {name} of {cluster}"), names, usages, days)
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    paths: &CertPaths,
    common_name: &str,
    names: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
) -> Result<CertPaths, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.subject_alt_names = names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    valid_for(&mut params, days);
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, issuer)?;
    write_pair(paths, &certificate.pem(), &key.serialize_pem())?;
    Ok(paths.clone())
}

/// The CA of `dir` and the cluster it names.
fn load_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), CertError> {
    let paths = ca_paths(dir);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
    };
    let (certificate, key) = (read(&paths.cert)?, read(&paths.key)?);
    let key = KeyPair::from_pem(&key)?;
    let issuer = Issuer::from_ca_cert_pem(&certificate, key)?;
    let cluster = cluster_of_ca(&certificate)
        .ok_or_else(|| CertError::Invalid(format!("{} is not a raft-host CA", paths.cert.display())))?;
    Ok((issuer, cluster))
}

/// The cluster a CA certificate (PEM) names.
fn cluster_of_ca(pem: &str) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let der = tokio_rustls::rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|der: tokio_rustls::rustls::pki_types::CertificateDer<'static>| der)
        .ok()?;
    let (_, certificate) = X509Certificate::from_der(&der).ok()?;
    let names = certificate.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => {
            let as_member = format!("{}/member/1", uri.strip_suffix(CA_URI_SUFFIX)?);
            Principal::from_uri(&as_member).map(|p| p.cluster().to_string())
        }
        _ => None,
    })
}

fn valid_for(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

fn refuse_existing(paths: &CertPaths) -> Result<(), CertError> {
    for path in [&paths.cert, &paths.key] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    Ok(())
}

/// Writes a certificate (readable by all) and its key (by the owner only).
fn write_pair(paths: &CertPaths, certificate: &str, key: &str) -> Result<(), CertError> {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
        move |source| CertError::Io { path: path.to_path_buf(), source }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&paths.key).map_err(io(&paths.key))?;
    file.write_all(key.as_bytes()).map_err(io(&paths.key))?;
    file.sync_all().map_err(io(&paths.key))?;
    std::fs::write(&paths.cert, certificate).map_err(io(&paths.cert))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal_in(paths: &CertPaths) -> Principal {
        let pem = std::fs::read(&paths.cert).expect("certificate");
        let der: tokio_rustls::rustls::pki_types::CertificateDer<'static> =
            tokio_rustls::rustls::pki_types::pem::PemObject::from_pem_slice(&pem).expect("PEM");
        Principal::of_certificate(&der).expect("a principal")
    }

    #[test]
    fn a_ca_issues_member_and_client_certificates_that_name_their_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = create_ca(dir.path(), "prod eu", 30).expect("CA");
        assert!(matches!(create_ca(dir.path(), "other", 30), Err(CertError::Exists { .. })), "never replaced");
        let member = issue_member(dir.path(), 2, &["127.0.0.1".into(), "node2.example".into()], 30).expect("member");
        assert_eq!(principal_in(&member), Principal::Member { cluster: "prod eu".into(), id: 2 });
        let client = issue_client(dir.path(), "ops", ClientRole::Admin, 30).expect("client");
        assert_eq!(
            principal_in(&client),
            Principal::Client { cluster: "prod eu".into(), role: ClientRole::Admin, name: "ops".into() }
        );
        #[cfg(unix)]
        for key in [&ca.key, &member.key, &client.key] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is readable by its owner only", key.display());
        }
        assert!(issue_client(dir.path(), "no spaces", ClientRole::Reader, 30).is_err());
        assert!(issue_member(dir.path(), 3, &[], 30).is_err());
    }
}
