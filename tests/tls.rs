//! mqtts:// against a Mosquitto TLS listener with certificates made by the test: server
//! authentication, client-certificate authentication, and a wrong CA refused clearly.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sensorgate::app::Gateway;
use sensorgate_sim::Format;
use support::*;
use tokio_util::sync::CancellationToken;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost signed by it, a client certificate signed by it,
/// and an unrelated CA.
fn make_certificates(dir: &Path) {
    let subj = |cn: &str| format!("/CN={cn}");
    for (name, cn) in [("ca", "test CA"), ("other", "other CA")] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-subj",
                &subj(cn),
            ],
        );
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "sensorgate")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &subj(cn),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

async fn state_of(db: &Path) -> Vec<(String, Option<String>)> {
    let pool = read_pool(db).await;
    sqlx::query_as("SELECT DISTINCT state, last_error FROM devices")
        .fetch_all(&pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_server_and_client_certificates_and_a_wrong_ca_refused() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let (tls_port, mtls_port) = (free_port(), free_port());
    let c = certs.path().display();
    let mosquitto = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\n\
         listener {mtls_port} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\n\
         require_certificate true\n"
    ));
    let s = scenario(Format::Json, 2, 50, 0, &unique("tls"));
    let scenarios = [(&s, "secure")];
    let expected = expected(&scenarios);

    let cases = [
        (
            "server auth",
            tls_port,
            format!("ca_file = \"{c}/ca.pem\"\n"),
            true,
        ),
        (
            "client certificate",
            mtls_port,
            format!(
                "ca_file = \"{c}/ca.pem\"\nclient_cert = \"{c}/client.pem\"\nclient_key = \"{c}/client.key\"\n"
            ),
            true,
        ),
        (
            "missing client certificate",
            mtls_port,
            format!("ca_file = \"{c}/ca.pem\"\n"),
            false,
        ),
        (
            "wrong CA",
            tls_port,
            format!("ca_file = \"{c}/other.pem\"\n"),
            false,
        ),
    ];
    for (case, port, tls, accepted) in cases {
        let dir = tempfile::tempdir().unwrap();
        let db = db_path(dir.path());
        let text = gateway_config(port, &db, &unique("gw"), "", &scenarios)
            .replace(
                &format!("mqtt://127.0.0.1:{port}"),
                &format!("mqtts://localhost:{port}"),
            )
            .replace("client_id", &format!("{tls}client_id"));
        let config = sensorgate::config::parse(&text, Path::new("tls.toml")).expect(case);
        let gateway = Gateway::build(config).await.unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
        let pool = read_pool(&db).await;
        let want = if accepted { "connected" } else { "failing" };
        wait_for_devices_in(&pool, want, 2).await;
        if accepted {
            // Published on the plain listener; received over TLS.
            let report = spawn_publisher(mosquitto.port, &s, sensorgate_sim::Pace::Unlimited)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(report.published, s.total_messages());
            let want = expected.readings.len();
            wait_for(
                &format!("{case}: readings stored"),
                Duration::from_secs(20),
                || {
                    let pool = pool.clone();
                    async move { stored_readings(&pool).await.len() == want }
                },
            )
            .await;
            assert_eq!(stored_readings(&pool).await, expected.readings, "{case}");
        } else {
            let states = state_of(&db).await;
            let error = states[0].1.clone().unwrap_or_default();
            println!("{case}: {error}");
            assert!(error.starts_with("broker test: "), "{case}: {error}");
            let clear = [
                "certificate",
                "Certificate",
                "TLS",
                "tls",
                "handshake",
                "closed",
            ];
            assert!(
                clear.iter().any(|w| error.contains(w)),
                "{case}: unclear error `{error}`"
            );
        }
        shutdown.cancel();
        running.await.unwrap().expect(case);
    }
}
