//! Alert deliveries to registered webhooks: Leaf's body format (spaced JSON), the
//! `X-Leaf-Signature` HMAC, sending with the shared client, and recording failed calls.
//! Callers clone the targets out of the store first: nothing here holds a lock while sending.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use uuid::Uuid;

use super::json::{now_micros, to_leaf_vec};
use super::state::{FailedCall, SimState, Webhook, lock};

/// The alert types credsync cares about.
pub(crate) const UNAUTHENTICATED_TYPE: &str = "credentialsUnauthenticated";
pub(crate) const LIMITED_PERMISSION_TYPE: &str = "credentialsLimitedPermission";

/// The body Leaf sends once when a webhook is registered.
pub(crate) const CONFIRMATION_MESSAGE: &str = "confirmation of webhook upon registration";

/// The alert type a credential status implies, if any.
pub(crate) fn type_for_status(status: &str) -> Option<&'static str> {
    match status {
        "UNAUTHENTICATED" => Some(UNAUTHENTICATED_TYPE),
        "MISSING_PERMISSION" => Some(LIMITED_PERMISSION_TYPE),
        _ => None,
    }
}

/// The status an alert type implies, if any.
pub(crate) fn status_for_type(kind: &str) -> Option<&'static str> {
    match kind {
        UNAUTHENTICATED_TYPE => Some("UNAUTHENTICATED"),
        LIMITED_PERMISSION_TYPE => Some("MISSING_PERMISSION"),
        _ => None,
    }
}

fn message_for_status(status: &str) -> String {
    match status {
        "UNAUTHENTICATED" => "The credential is no longer valid. Please update it.".to_owned(),
        "MISSING_PERMISSION" => {
            "The credential does not have the permissions needed to access the data.".to_owned()
        }
        other => format!("The credential status changed to {other}."),
    }
}

/// A credential alert, fields in Leaf's order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AlertBody {
    pub credential: String,
    pub provider: String,
    pub credential_id: String,
    pub message: String,
    pub status: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
}

impl AlertBody {
    /// An alert about credential `credential_id` of provider `provider_name`.
    pub(crate) fn new(provider_name: &str, credential_id: &str, status: &str, kind: &str) -> Self {
        AlertBody {
            credential: format!("{provider_name}Credentials"),
            provider: provider_name.to_owned(),
            credential_id: credential_id.to_owned(),
            message: message_for_status(status),
            status: status.to_owned(),
            kind: kind.to_owned(),
            timestamp: now_micros(),
        }
    }

    /// The exact bytes sent (Leaf's spaced JSON).
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        to_leaf_vec(self)
    }
}

/// The confirmation body sent on registration.
pub(crate) fn confirmation_bytes() -> Vec<u8> {
    to_leaf_vec(&serde_json::json!({ "message": CONFIRMATION_MESSAGE }))
}

/// `X-Leaf-Signature`: standard base64 of HMAC-SHA256(secret, body).
pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).map(|mut m| {
        m.update(body);
        m.finalize().into_bytes()
    });
    match mac {
        Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
        // HMAC accepts keys of any length; this branch is unreachable in practice.
        Err(_) => String::new(),
    }
}

/// Which signature a delivery carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signing {
    Valid,
    Invalid,
    None,
}

/// Where one delivery went and what came back.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Delivery {
    pub url: String,
    /// The HTTP status answered; `null` when the call failed.
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends `body` to `hook`; a non-2xx answer or an error is listed in failed calls.
pub(crate) async fn deliver(
    state: &SimState,
    hook: &Webhook,
    body: &[u8],
    signing: Signing,
) -> Delivery {
    let mut req = state
        .http
        .post(&hook.url)
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    match signing {
        Signing::Valid => req = req.header("X-Leaf-Signature", sign(&hook.secret, body)),
        Signing::Invalid => {
            let wrong = format!("{}-not-the-secret", hook.secret);
            req = req.header("X-Leaf-Signature", sign(&wrong, body));
        }
        Signing::None => {}
    }
    let (status, error) = match req.send().await {
        Ok(res) => (Some(res.status().as_u16()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    if !ok {
        tracing::debug!(url = %hook.url, ?status, ?error, "leaf-sim webhook delivery failed");
        lock(&state.store).add_failed_call(FailedCall {
            id: Uuid::new_v4(),
            webhook_id: hook.id,
            url: hook.url.clone(),
            body: String::from_utf8_lossy(body).into_owned(),
            status_code: status,
            error: error.clone(),
            created_time: now_micros(),
        });
    }
    Delivery {
        url: hook.url.clone(),
        status,
        error,
    }
}

/// Sends `body` to every hook in `hooks`, concurrently.
pub(crate) async fn deliver_all(
    state: &SimState,
    hooks: &[Webhook],
    body: &[u8],
    signing: Signing,
) -> Vec<Delivery> {
    futures_util::future::join_all(hooks.iter().map(|h| deliver(state, h, body, signing))).await
}

/// The webhooks registered for alert type `kind`.
pub(crate) fn hooks_for(state: &SimState, kind: &str) -> Vec<Webhook> {
    lock(&state.store)
        .webhooks
        .iter()
        .filter(|w| w.events.iter().any(|e| e == kind))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_body_is_spaced_and_ordered_like_leaf() {
        let mut a = AlertBody::new(
            "ClimateFieldView",
            "c1",
            "UNAUTHENTICATED",
            UNAUTHENTICATED_TYPE,
        );
        a.timestamp = "2026-01-02T03:04:05.123456Z".into();
        let s = String::from_utf8(a.to_bytes()).unwrap();
        assert!(s.starts_with(r#"{"credential": "ClimateFieldViewCredentials", "provider": "ClimateFieldView", "credentialId": "c1", "message": "#), "{s}");
        assert!(s.ends_with(r#""status": "UNAUTHENTICATED", "type": "credentialsUnauthenticated", "timestamp": "2026-01-02T03:04:05.123456Z"}"#), "{s}");
    }

    #[test]
    fn signature_is_base64_hmac_sha256() {
        // RFC 4231 test case 2.
        let sig = sign("Jefe", b"what do ya want for nothing?");
        let hex = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(sig, base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}
