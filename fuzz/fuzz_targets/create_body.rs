//! `CreateBody::parse` on arbitrary bytes: never a panic; an error never carries a secret
//! field's value; a success round-trips through its canonical JSON.
#![no_main]
use credsync::domain::CreateBody;
use credsync::domain::provider::CLIMATE_FIELD_VIEW;
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

const FIELDS: [&str; 4] = ["clientId", "clientSecret", "apiKey", "refreshToken"];

fuzz_target!(|data: &[u8]| {
    match CreateBody::parse(&CLIMATE_FIELD_VIEW, data) {
        Ok(b) => {
            let canonical: serde_json::Value =
                serde_json::from_str(b.canonical.expose_secret()).unwrap();
            let input: serde_json::Value = serde_json::from_slice(data).unwrap();
            assert_eq!(canonical, input);
            for name in &FIELDS[1..] {
                assert_eq!(
                    b.secrets.get(name).map(|s| s.expose_secret()),
                    input[name].as_str()
                );
            }
        }
        Err(e) => {
            assert!(e.len() < 300, "{e}");
            // With only known fields, no secret field's value may appear in the error.
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data)
                && m.keys().all(|k| FIELDS.contains(&k.as_str()))
            {
                for name in &FIELDS[1..] {
                    if let Some(v) = m.get(*name).and_then(|v| v.as_str())
                        && v.len() >= 6
                        && !FIELDS.iter().any(|f| f.contains(v))
                    {
                        assert!(!e.contains(v), "{e:?} echoes {v:?}");
                    }
                }
            }
        }
    }
});
