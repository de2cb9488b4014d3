//! The STOMP transport over TLS, against a small STOMP stub behind tokio-rustls with certificates
//! made here by rcgen: a private CA bundle, server-name checks (and turning them off), client
//! certificates, unreadable TLS files, a refused login, and failover. No broker is needed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::OutboxConfig;
use outbox::config::Secret;
use outbox::transport::{Outgoing, StompSettings, StompTransport, Transport, TransportError};
use outbox_tests::certs::{Ca, Files, Leaf};
use outbox_tests::stomp_peer::unescape;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// The receipt timeout of every test: the stub answers at once, so this only bounds failures.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A passcode distinctive enough that finding it in any text is no accident.
const PASSCODE: &str = "pw-Xq7-zebra-41-s3cr3t";

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The stub broker
// ---------------------------------------------------------------------------------------------

/// One frame the stub received, headers unescaped.
#[derive(Debug, Clone)]
struct Frame {
    command: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Frame {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What one accepted TLS session looked like from the server side.
#[derive(Debug, Clone)]
struct Session {
    /// The SNI the client sent (none for an IP address).
    sni: Option<String>,
    /// Whether the client presented a certificate.
    client_certificate: bool,
}

#[derive(Default)]
struct Seen {
    frames: Vec<Frame>,
    sessions: Vec<Session>,
    /// Failed TLS handshakes, as the server saw them.
    handshake_errors: Vec<String>,
}

struct StubOptions<'a> {
    server: &'a Leaf,
    /// Require client certificates signed by this CA.
    client_ca: Option<&'a Ca>,
    /// Answer CONNECT with an ERROR, as RabbitMQ does for a wrong login.
    refuse_login: bool,
}

/// A STOMP 1.2 server stub on 127.0.0.1 behind TLS: CONNECTED (or ERROR) for CONNECT, RECEIPT
/// for every frame asking for one; it records what it receives.
struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    async fn start(options: StubOptions<'_>) -> Stub {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match options.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.der.clone()).expect("client CA");
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(vec![options.server.der.clone()], options.server.key())
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let refuse_login = options.refuse_login;
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(acceptor.clone(), tcp, seen.clone(), refuse_login));
                }
            }
        });
        Stub { addr, seen, task }
    }

    fn frames(&self) -> Vec<Frame> {
        self.seen.lock().unwrap().frames.clone()
    }

    fn commands(&self) -> Vec<String> {
        self.frames().into_iter().map(|f| f.command).collect()
    }

    fn sessions(&self) -> Vec<Session> {
        self.seen.lock().unwrap().sessions.clone()
    }

    fn handshake_errors(&self) -> Vec<String> {
        self.seen.lock().unwrap().handshake_errors.clone()
    }

    /// Waits until the stub has seen `count` failed handshakes (the client may learn of a
    /// failure before the server side has recorded it).
    async fn wait_for_handshake_errors(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while self.handshake_errors().len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {count} failed handshakes, saw {:?}",
                self.handshake_errors()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            self.handshake_errors().len(),
            count,
            "{:?}",
            self.handshake_errors()
        );
    }
}

async fn serve(acceptor: TlsAcceptor, tcp: TcpStream, seen: Arc<Mutex<Seen>>, refuse: bool) {
    let mut tls = match acceptor.accept(tcp).into_fallible().await {
        Ok(tls) => tls,
        Err((err, mut tcp)) => {
            seen.lock().unwrap().handshake_errors.push(err.to_string());
            // Read what the client still sends before closing, so that the close is a FIN after
            // the alert rather than a reset that could overtake it.
            let mut sink = [0u8; 1024];
            let drain = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            return;
        }
    };
    {
        let (_, server) = tls.get_ref();
        seen.lock().unwrap().sessions.push(Session {
            sni: server.server_name().map(str::to_owned),
            client_certificate: server.peer_certificates().is_some_and(|c| !c.is_empty()),
        });
    }
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(frame) = take_frame(&mut buffer) {
            seen.lock().unwrap().frames.push(frame.clone());
            let mut reply = Vec::new();
            let login = matches!(frame.command.as_str(), "CONNECT" | "STOMP");
            if login && refuse {
                reply.extend_from_slice(b"ERROR\nmessage:Access refused for user 'guest'\n\n\0");
            } else if login {
                reply.extend_from_slice(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0");
            }
            if let Some(id) = frame.header("receipt") {
                reply.extend_from_slice(format!("RECEIPT\nreceipt-id:{id}\n\n\0").as_bytes());
            }
            if !reply.is_empty()
                && (tls.write_all(&reply).await.is_err() || tls.flush().await.is_err())
            {
                return;
            }
            if (login && refuse) || frame.command == "DISCONNECT" {
                let _ = tls.shutdown().await;
                return;
            }
        }
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Takes one complete frame off the front of `buffer`, skipping heartbeat newlines.
fn take_frame(buffer: &mut Vec<u8>) -> Option<Frame> {
    let start = buffer.iter().position(|b| *b != b'\n' && *b != b'\r');
    let Some(start) = start else {
        buffer.clear();
        return None;
    };
    buffer.drain(..start);
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let end = pos + buffer[pos..].iter().position(|b| *b == b'\n')?;
        let line = &buffer[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos = end + 1;
        if line.is_empty() {
            break;
        }
        lines.push(String::from_utf8_lossy(line).into_owned());
    }
    let command = lines.first()?.clone();
    let escaped = !matches!(command.as_str(), "CONNECT" | "STOMP");
    let headers: Vec<(String, String)> = lines[1..]
        .iter()
        .map(|line| {
            let (key, value) = line.split_once(':').unwrap_or((line, ""));
            if escaped {
                (
                    unescape(key).expect("a header name"),
                    unescape(value).expect("a header value"),
                )
            } else {
                (key.to_owned(), value.to_owned())
            }
        })
        .collect();
    let length = headers
        .iter()
        .find(|(key, _)| key == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok());
    let body_end = match length {
        Some(length) => {
            if buffer.len() <= pos + length {
                return None;
            }
            assert_eq!(buffer[pos + length], 0, "no NUL after content-length bytes");
            pos + length
        }
        None => pos + buffer[pos..].iter().position(|b| *b == 0)?,
    };
    let body = buffer[pos..body_end].to_vec();
    buffer.drain(..=body_end);
    Some(Frame {
        command,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A stub serving a certificate for `names` from a fresh test CA, without client certificates,
/// and the folder to write its CA bundle to.
async fn stub_of_a_test_ca(names: &[&str]) -> (Files, Ca, Stub) {
    let files = Files::new();
    let ca = Ca::new("outbox test CA");
    let server = ca.server(names);
    let stub = Stub::start(StubOptions {
        server: &server,
        client_ca: None,
        refuse_login: false,
    })
    .await;
    (files, ca, stub)
}

/// Settings for `addresses` that trust `ca`, its bundle written to `files`.
fn trusting(files: &Files, ca: &Ca, addresses: &[SocketAddr]) -> OutboxConfig {
    let mut config = config(addresses);
    config.stomp_ca_certs = Some(files.write("ca.pem", &ca.pem));
    config
}

/// TLS on, the given addresses, a short receipt timeout, the distinctive passcode.
fn config(addresses: &[SocketAddr]) -> OutboxConfig {
    let mut config = OutboxConfig::default();
    config.stomp_host_and_ports = addresses
        .iter()
        .map(|a| (a.ip().to_string(), a.port()))
        .collect();
    config.stomp_use_ssl = true;
    config.stomp_passcode = Secret::new(PASSCODE);
    config.receipt_timeout = TIMEOUT;
    config
}

fn message(n: u32) -> Outgoing {
    Outgoing {
        destination: "/topic/orders.v1".into(),
        headers: vec![("x-outbox-test".into(), format!("message {n}"))],
        body: format!(r#"{{"id": {n}, "note": "ünïcode"}}"#).into_bytes(),
    }
}

/// `StompTransport::new` that must succeed.
fn new_transport(config: &OutboxConfig) -> StompTransport {
    match StompTransport::new(StompSettings::from(config)) {
        Ok(transport) => transport,
        Err(err) => panic!("StompTransport::new failed: {err}"),
    }
}

/// `StompTransport::new` that must fail.
fn new_error(config: &OutboxConfig) -> TransportError {
    match StompTransport::new(StompSettings::from(config)) {
        Ok(_) => panic!("StompTransport::new accepted {config:?}"),
        Err(err) => err,
    }
}

/// Sends two messages and checks that both were receipted.
async fn sends_two(transport: &StompTransport) {
    let report = transport.send(&[message(1), message(2)]).await;
    assert_eq!(
        report.receipted(),
        vec![true, true],
        "{:?}",
        report.failure()
    );
    assert!(report.all_receipted());
    assert!(report.failure().is_none(), "{:?}", report.failure());
}

/// Connects, which must fail, and returns why.
async fn connect_error(transport: &StompTransport) -> TransportError {
    match tokio::time::timeout(TIMEOUT * 3, transport.connect()).await {
        Ok(Ok(())) => panic!("the connection should have failed"),
        Ok(Err(err)) => err,
        Err(_) => panic!("connect did not finish"),
    }
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

fn assert_certificate_problem(err: &TransportError, what: &str) {
    assert!(
        matches!(err, TransportError::Connect { .. }),
        "expected a connection error, got {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("certificate") && text.contains(what),
        "the error should name the certificate problem ({what}): {text}"
    );
}

fn assert_tls_error_names(err: &TransportError, path: &Path) {
    let TransportError::Tls(text) = err else {
        panic!(
            "expected TransportError::Tls naming {}, got {err:?}",
            path.display()
        );
    };
    assert!(
        text.contains(&path.display().to_string()),
        "the error should name {}: {text}",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn with_the_ca_bundle_and_the_right_name_sends_are_receipted_over_tls() {
    let (files, ca, stub) = stub_of_a_test_ca(&["127.0.0.1", "localhost"]).await;
    let config = trusting(&files, &ca, &[stub.addr]);

    let transport = new_transport(&config);
    sends_two(&transport).await;
    transport.disconnect().await.expect("DISCONNECT receipted");

    assert_eq!(stub.commands(), ["CONNECT", "SEND", "SEND", "DISCONNECT"]);
    let frames = stub.frames();
    let connect = &frames[0];
    assert_eq!(connect.header("accept-version"), Some("1.2"));
    assert_eq!(connect.header("host"), Some("/"));
    assert_eq!(connect.header("login"), Some("guest"));
    assert_eq!(connect.header("passcode"), Some(PASSCODE));
    assert_eq!(connect.header("heart-beat"), Some("10000,10000"));
    let mut receipts = Vec::new();
    for (n, send) in (1..).zip(&frames[1..3]) {
        let expected = message(n);
        assert_eq!(send.header("destination"), Some("/topic/orders.v1"));
        assert_eq!(
            send.header("x-outbox-test"),
            Some(format!("message {n}").as_str())
        );
        assert_eq!(
            send.header("content-length"),
            Some(expected.body.len().to_string().as_str()),
            "{send:?}"
        );
        assert_eq!(send.body, expected.body);
        let receipt = send.header("receipt").expect("a receipt request");
        receipts.push(receipt.to_owned());
    }
    assert_ne!(receipts[0], receipts[1], "receipt ids must differ");
    // The certificate was checked against the address itself: no SNI for an IP address.
    assert_eq!(stub.sessions().len(), 1);
    assert_eq!(stub.sessions()[0].sni, None);
    assert!(
        stub.handshake_errors().is_empty(),
        "{:?}",
        stub.handshake_errors()
    );
}

#[tokio::test]
async fn without_a_ca_bundle_a_private_ca_is_not_trusted() {
    let ca = Ca::new("outbox private CA");
    let server = ca.server(&["127.0.0.1", "localhost"]);
    let stub = Stub::start(StubOptions {
        server: &server,
        client_ca: None,
        refuse_login: false,
    })
    .await;
    // stomp_ca_certs unset: the public web roots only.
    let transport = new_transport(&config(&[stub.addr]));

    let err = connect_error(&transport).await;
    assert_certificate_problem(&err, "UnknownIssuer");
    assert!(
        err.to_string().contains(&stub.addr.to_string()),
        "the error should name the address: {err}"
    );
    // A send reports the same failure, and nothing reached the stub.
    let report = transport.send(&[message(1)]).await;
    assert_eq!(report.receipted(), vec![false]);
    assert_certificate_problem(report.failure().expect("a failure"), "UnknownIssuer");
    assert!(stub.frames().is_empty(), "{:?}", stub.frames());
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_unless_that_name_is_configured() {
    let (files, ca, stub) = stub_of_a_test_ca(&["broker.internal"]).await;
    let config = trusting(&files, &ca, &[stub.addr]);

    // By default the certificate must name the address connected to.
    let err = connect_error(&new_transport(&config)).await;
    assert_certificate_problem(&err, "not valid for name");
    assert!(stub.frames().is_empty(), "{:?}", stub.frames());

    // Told the name the broker's certificate carries, it connects (and sends it as SNI).
    let mut named = config.clone();
    named.stomp_tls_server_name = Some("broker.internal".into());
    let named = new_transport(&named);
    sends_two(&named).await;
    assert_eq!(
        stub.sessions()
            .last()
            .and_then(|s| s.sni.clone())
            .as_deref(),
        Some("broker.internal")
    );
    // A wrong configured name fails like a wrong address.
    let mut wrong = config.clone();
    wrong.stomp_tls_server_name = Some("other.internal".into());
    let err = connect_error(&new_transport(&wrong)).await;
    assert_certificate_problem(&err, "not valid for name");
}

#[tokio::test]
async fn without_hostname_verification_any_name_passes_but_the_chain_is_still_checked() {
    let (files, ca, stub) = stub_of_a_test_ca(&["broker.internal"]).await;
    let mut config = trusting(&files, &ca, &[stub.addr]);
    config.stomp_tls_verify_hostname = false;

    sends_two(&new_transport(&config)).await;
    assert_eq!(stub.commands(), ["CONNECT", "SEND", "SEND"]);

    // Another CA's bundle: the chain does not verify, hostname check or not.
    let other = Ca::new("some other CA");
    let mut untrusted = config.clone();
    untrusted.stomp_ca_certs = Some(files.write("other-ca.pem", &other.pem));
    let err = connect_error(&new_transport(&untrusted)).await;
    assert_certificate_problem(&err, "UnknownIssuer");

    // No bundle at all (the public roots): refused before any connection, naming the setting
    // (any publicly trusted certificate for any name would pass).
    let mut public = config.clone();
    public.stomp_ca_certs = None;
    let err = new_error(&public);
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    assert!(
        err.to_string().contains("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME"),
        "{err}"
    );
    let err = public.validate().unwrap_err().to_string();
    assert!(err.contains("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME"), "{err}");
    assert!(err.contains("OUTBOX_STOMP_CA_CERTS"), "{err}");
    assert_eq!(stub.commands().len(), 3, "{:?}", stub.commands());
}

#[tokio::test]
async fn a_server_requiring_client_certificates_accepts_the_configured_one_only() {
    let files = Files::new();
    let ca = Ca::new("outbox test CA");
    let client_ca = Ca::new("outbox client CA");
    let server = ca.server(&["127.0.0.1"]);
    let stub = Stub::start(StubOptions {
        server: &server,
        client_ca: Some(&client_ca),
        refuse_login: false,
    })
    .await;
    let mut config = trusting(&files, &ca, &[stub.addr]);

    // Without a client certificate the server ends the handshake.
    let err = connect_error(&new_transport(&config)).await;
    assert!(
        matches!(err, TransportError::Connect { .. }),
        "expected a connection error, got {err:?}"
    );
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the error should say a certificate was wanted: {err}"
    );
    assert!(stub.sessions().is_empty(), "{:?}", stub.sessions());
    stub.wait_for_handshake_errors(1).await;

    // A certificate the server's client CA did not sign is refused too.
    let stranger = ca.client("stranger");
    let mut wrong = config.clone();
    wrong.stomp_cert_file = Some(files.write("stranger.pem", &stranger.cert_pem));
    wrong.stomp_key_file = Some(files.write("stranger.key", &stranger.key_pem));
    let err = connect_error(&new_transport(&wrong)).await;
    assert!(
        matches!(err, TransportError::Connect { .. }),
        "expected a connection error, got {err:?}"
    );
    stub.wait_for_handshake_errors(2).await;

    // With the certificate and key the server trusts, it works.
    let client = client_ca.client("outbox relay");
    config.stomp_cert_file = Some(files.write("client.pem", &client.cert_pem));
    config.stomp_key_file = Some(files.write("client.key", &client.key_pem));
    sends_two(&new_transport(&config)).await;
    assert_eq!(stub.commands(), ["CONNECT", "SEND", "SEND"]);
    let sessions = stub.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0].client_certificate);
}

/// The TLS settings that name a file.
enum TlsFile {
    Ca,
    Cert,
    Key,
}

#[tokio::test]
async fn unreadable_tls_files_fail_at_construction_naming_the_file() {
    let files = Files::new();
    let ca = Ca::new("outbox test CA");
    let client = ca.client("outbox relay");
    let good_ca = files.write("ca.pem", &ca.pem);
    let good_cert = files.write("client.pem", &client.cert_pem);
    let good_key = files.write("client.key", &client.key_pem);
    let garbage = files.write("garbage.pem", "this is not PEM at all\n");
    let bad_block = files.write(
        "bad-block.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    // A certificate where the key should be: PEM, but no private key in it.
    let cert_as_key = files.write("cert-as-key.pem", &client.cert_pem);
    let base = {
        let mut base = config(&["127.0.0.1:61614".parse().unwrap()]);
        base.stomp_ca_certs = Some(good_ca.clone());
        base.stomp_cert_file = Some(good_cert.clone());
        base.stomp_key_file = Some(good_key.clone());
        base
    };
    // The good files are accepted (connecting is lazy, so no broker is needed).
    new_transport(&base);

    let missing_ca = files.missing("no-ca.pem");
    let missing_cert = files.missing("no-cert.pem");
    let missing_key = files.missing("no-key.pem");
    let cases = [
        ("missing CA bundle", TlsFile::Ca, &missing_ca),
        ("garbage CA bundle", TlsFile::Ca, &garbage),
        ("undecodable CA certificate", TlsFile::Ca, &bad_block),
        ("missing client certificate", TlsFile::Cert, &missing_cert),
        ("garbage client certificate", TlsFile::Cert, &garbage),
        ("missing key", TlsFile::Key, &missing_key),
        ("garbage key", TlsFile::Key, &garbage),
        ("a certificate as key", TlsFile::Key, &cert_as_key),
    ];
    for (case, file, path) in cases {
        let mut config = base.clone();
        let slot = match file {
            TlsFile::Ca => &mut config.stomp_ca_certs,
            TlsFile::Cert => &mut config.stomp_cert_file,
            TlsFile::Key => &mut config.stomp_key_file,
        };
        *slot = Some(path.clone());
        let err = new_error(&config);
        assert!(
            matches!(&err, TransportError::Tls(_)),
            "{case}: expected TransportError::Tls, got {err:?}"
        );
        assert_tls_error_names(&err, path);
        assert!(!err.to_string().contains(PASSCODE), "{case}: {err}");
    }
}

#[tokio::test]
async fn a_refused_login_is_reported_with_the_brokers_message_and_never_the_passcode() {
    let files = Files::new();
    let ca = Ca::new("outbox test CA");
    let server = ca.server(&["127.0.0.1"]);
    let stub = Stub::start(StubOptions {
        server: &server,
        client_ca: None,
        refuse_login: true,
    })
    .await;
    let config = trusting(&files, &ca, &[stub.addr]);

    let transport = new_transport(&config);
    let err = connect_error(&transport).await;
    let TransportError::Refused {
        address,
        message: refusal,
    } = &err
    else {
        panic!("expected TransportError::Refused, got {err:?}");
    };
    assert_eq!(address, &stub.addr.to_string());
    assert!(
        refusal.contains("Access refused for user 'guest'"),
        "the broker's message should be kept: {refusal}"
    );
    let report = transport.send(&[message(1)]).await;
    assert_eq!(report.receipted(), vec![false]);
    let failure = report.failure().cloned().expect("a failure");
    assert!(
        matches!(failure, TransportError::Refused { .. }),
        "{failure:?}"
    );

    // The passcode went to the broker, and nowhere else.
    assert_eq!(stub.frames()[0].header("passcode"), Some(PASSCODE));
    for text in [
        err.to_string(),
        format!("{err:?}"),
        failure.to_string(),
        format!("{failure:?}"),
        format!("{config:?}"),
        format!("{:?}", config.stomp_passcode),
    ] {
        assert!(!text.contains(PASSCODE), "the passcode leaked: {text}");
    }
}

#[tokio::test]
async fn failover_skips_a_closed_port_and_connects_to_the_next_address() {
    let (files, ca, stub) = stub_of_a_test_ca(&["127.0.0.1"]).await;
    let closed = closed_port().await;
    let config = trusting(&files, &ca, &[closed, stub.addr]);

    let transport = new_transport(&config);
    sends_two(&transport).await;
    assert_eq!(stub.commands(), ["CONNECT", "SEND", "SEND"]);

    // With the stub gone too, the error names every address tried.
    drop(transport);
    let mut dead = config.clone();
    dead.stomp_host_and_ports = vec![
        ("127.0.0.1".into(), closed.port()),
        ("127.0.0.1".into(), closed_port().await.port()),
    ];
    let err = connect_error(&new_transport(&dead)).await;
    let TransportError::Connect { addresses, .. } = &err else {
        panic!("expected TransportError::Connect, got {err:?}");
    };
    assert!(addresses.contains(&closed.to_string()), "{err}");
    assert!(addresses.contains(", "), "{err}");
}
