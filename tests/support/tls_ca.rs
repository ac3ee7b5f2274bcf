//! A certificate authority of the tests' own, made with rcgen: its root for the client's
//! configuration, and server certificates it signs for the stage.

#![allow(dead_code)] // each test binary uses its own part

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate chain and its key, for `Stage::builder().tls(..)`.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The root, as `Configuration::builder().add_root_certificate` takes it.
    pub fn root(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// The root in PEM, as a file named by `LEAKPROOF_EXTRA_CA_CERTS` holds it.
    pub fn root_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A stage speaking TLS on the loopback address `ip`, with a certificate of this CA's for
    /// it, that resumes sessions with stateless tickets (it keeps nothing per session).
    pub async fn stage_on(&self, ip: std::net::Ipv4Addr) -> leakproof_check::stage::Stage {
        let cert = self.server_for(&[&ip.to_string()], None);
        leakproof_check::stage::Stage::builder()
            .loopback(ip)
            .tls(cert.chain, cert.key)
            .stateless_tickets()
            .start()
            .await
            .unwrap()
    }

    /// A stage speaking TLS with a certificate of this CA's for 127.0.0.1 and `localhost`.
    pub async fn stage(&self) -> leakproof_check::stage::Stage {
        let cert = self.server();
        leakproof_check::stage::Stage::builder()
            .tls(cert.chain, cert.key)
            .start()
            .await
            .unwrap()
    }

    /// A certificate for the stage's address (127.0.0.1) and `localhost`.
    pub fn server(&self) -> ServerCert {
        self.server_for(&["localhost", "127.0.0.1"], None)
    }

    /// A certificate for `names` (DNS names or IP addresses), valid from `years.0` to
    /// `years.1` (1 January of each) if given.
    pub fn server_for(&self, names: &[&str], years: Option<(i32, i32)>) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "leakproof stage");
        if let Some((from, to)) = years {
            params.not_before = date_time_ymd(from, 1, 1);
            params.not_after = date_time_ymd(to, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert {
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}
