//! The real binary: usage, configuration errors, key generation, token minting.
use std::process::Command;

fn credsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_credsync"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CREDSYNC_LOG_FORMAT", "json");
    c
}

/// The binary with a usable JWT secret and encryption key, and nothing else configured.
fn with_keys() -> Command {
    let mut c = credsync();
    c.env("CREDSYNC_JWT_HS256_SECRET", "super-secret-jwt-value-123")
        .env(
            "CREDSYNC_ENCRYPTION_KEYS",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
    c
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["dev", "--help"],
        vec!["migrate", "--help"],
        vec!["keys", "generate", "--help"],
        vec!["keys", "rotate", "--help"],
        vec!["token", "mint", "--help"],
        vec!["leaf-sim", "--help"],
        vec!["sync", "--help"],
    ] {
        let out = credsync().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn bad_usage_exits_2() {
    let out = credsync().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_simulator_on_an_unusable_address_exits_2_naming_the_option() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for addr in ["nope", busy.as_str()] {
        let out = credsync()
            .args(["leaf-sim", "--listen", addr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("credsync: --listen: cannot listen on"),
            "{err}"
        );
    }
}

#[test]
fn a_missing_setting_exits_2_naming_it_without_printing_secrets() {
    let out = with_keys().arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = credsync()
        .arg("serve")
        .env("DATABASE_URL", "postgres://u:pw-hunter2@127.0.0.1:1/db")
        .env("CREDSYNC_JWT_HS256_SECRET", "super-secret-jwt-value-123")
        .env("CREDSYNC_ENCRYPTION_KEYS", "k1:c2hvcnQ=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CREDSYNC_ENCRYPTION_KEYS"), "{err}");
    assert!(
        !err.contains("c2hvcnQ") && !err.contains("hunter2") && !err.contains("super-secret"),
        "{err}"
    );
}

#[test]
fn keys_generate_prints_a_fresh_32_byte_key() {
    use base64::Engine as _;
    let a = credsync().args(["keys", "generate"]).output().unwrap();
    let b = credsync().args(["keys", "generate"]).output().unwrap();
    let (a, b) = (
        String::from_utf8(a.stdout).unwrap(),
        String::from_utf8(b.stdout).unwrap(),
    );
    assert_ne!(a, b);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .unwrap()
            .len(),
        32
    );
}

#[test]
fn token_mint_makes_a_token_the_service_accepts() {
    let out = credsync()
        .args([
            "token",
            "mint",
            "--sub",
            "svc",
            "--scope",
            "status:read admin",
            "--ttl",
            "15m",
        ])
        .env("CREDSYNC_JWT_HS256_SECRET", crate::helpers::JWT_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = credsync::auth::Verifier::new(&credsync::config::JwtSettings {
        hs256_secret: Some(secrecy::SecretString::from(crate::helpers::JWT_SECRET)),
        public_keys_file: None,
        issuer: None,
        audience: "credsync".into(),
        leeway_secs: 0,
    })
    .unwrap();
    let caller = verifier.verify(token.trim()).unwrap();
    assert_eq!(caller.sub, "svc");
    let out = credsync()
        .args(["token", "mint", "--sub", "svc", "--scope", "admin"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no secret configured");
}

/// The worker's container health check (a `--sync-only` worker serves no HTTP): Postgres
/// answers and every migration is applied.
#[tokio::test]
async fn healthcheck_database_needs_postgres_and_every_migration() {
    let url = crate::db::fresh_database_url().await;
    let check = |url: &str| {
        credsync()
            .args(["healthcheck", "--database"])
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    };
    let out = check(&url);
    assert!(!out.status.success(), "an empty database passed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("migrations are pending"));
    let out = credsync()
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nobody listens on port 1.
    let out = check("postgres://credsync:pw-hunter2@127.0.0.1:1/credsync");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[test]
fn a_malformed_database_url_exits_2_naming_it_without_the_password() {
    for url in [
        "postgres://u:pw-hunter2@127.0.0.1:notaport/db",
        "postgres://u:pw-hunter2@127.0.0.1:99999/db",
        "postgres://u:pw-hunter2@127.0.0.1/db?sslmode=bogus",
    ] {
        for command in [
            &["serve"][..],
            &["migrate"],
            &["keys", "rotate"],
            &["sync", "--once"],
        ] {
            let out = with_keys()
                .args(command)
                .env("DATABASE_URL", url)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command:?} {url}: {err}");
            assert!(err.contains("DATABASE_URL"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}

#[test]
fn token_mint_refuses_a_sub_the_service_would_refuse() {
    for sub in ["", "line\nbreak", &"x".repeat(257)] {
        let out = credsync()
            .args(["token", "mint", "--sub", sub, "--scope", "status:read"])
            .env("CREDSYNC_JWT_HS256_SECRET", "super-secret-jwt-value-123")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub:?}");
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--sub"));
    }
}

#[test]
fn a_config_file_key_that_names_no_setting_is_reported_and_ignored() {
    let dir = std::env::temp_dir().join(format!("credsync-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("credsync.toml");
    std::fs::write(
        &file,
        "jwt_hs256_secret = \"super-secret-jwt-value-123\"\njwt_audiance = \"typo\"\n",
    )
    .unwrap();
    let out = credsync()
        .args(["--config", file.to_str().unwrap()])
        .args(["token", "mint", "--sub", "svc", "--scope", "status:read"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!out.stdout.is_empty(), "a token is printed");
    assert!(
        stderr.contains("`jwt_audiance` is not a setting"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("jwt_hs256_secret") && !stderr.contains("super-secret"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
