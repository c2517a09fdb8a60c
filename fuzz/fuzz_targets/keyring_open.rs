//! `Keyring::open` on arbitrary stored rows (even first byte) and on edited sealed credentials
//! (odd): never a panic, and any change is an error.
#![no_main]
use std::sync::LazyLock;

use base64::Engine as _;
use credsync::crypto::{Binding, Keyring, Sealed, SecretFields};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

#[path = "mutate.rs"]
mod mutate;

const USER: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c3a52_8d5e_4c7b_9d0e_2a1b3c4d5e6f);

fn binding() -> Binding<'static> {
    Binding {
        leaf_user_id: &USER,
        provider: "climate-field-view",
    }
}

static RING: LazyLock<Keyring> = LazyLock::new(|| {
    let key = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    Keyring::parse(&format!("a:{},b:{}", key(1), key(2)), Some("b"), None).unwrap()
});

static SEALED: LazyLock<Sealed> = LazyLock::new(|| {
    let mut f = SecretFields::default();
    f.insert("clientSecret", SecretString::from("client-secret-value"));
    f.insert("apiKey", SecretString::from("api-key-value"));
    f.insert("refreshToken", SecretString::from("refresh-token-value"));
    RING.seal(binding(), &f).unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        // [key id length][key id][wrapped key length][wrapped key][secrets]
        let (id_len, rest) = rest
            .split_first()
            .map_or((0, rest), |(n, r)| (usize::from(*n % 8), r));
        let (id, rest) = rest.split_at(id_len.min(rest.len()));
        let (wk_len, rest) = rest
            .split_first()
            .map_or((0, rest), |(n, r)| (usize::from(*n), r));
        let (wrapped_key, secrets) = rest.split_at(wk_len.min(rest.len()));
        let sealed = Sealed {
            key_id: String::from_utf8_lossy(id).into_owned(),
            wrapped_key: wrapped_key.to_vec(),
            secrets: secrets.to_vec(),
        };
        assert!(RING.open(binding(), &sealed).is_err());
        let _ = RING.rewrap(binding(), &sealed);
    } else {
        let good = &*SEALED;
        let mut bad = good.clone();
        match mode / 2 % 3 {
            0 => bad.wrapped_key = mutate::apply(&good.wrapped_key, rest),
            1 => bad.secrets = mutate::apply(&good.secrets, rest),
            _ => {
                bad.key_id = String::from_utf8_lossy(&mutate::apply(good.key_id.as_bytes(), rest))
                    .into_owned()
            }
        }
        let out = RING.open(binding(), &bad);
        if bad != *good {
            assert!(out.is_err(), "opened an edited blob");
        } else {
            assert!(out.is_ok());
        }
    }
});
