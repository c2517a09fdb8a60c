//! Providers are data: a path segment, the create fields, which fields are secret.
//! Adding John Deere or CNHi is a table entry (plus tests), not new handlers.

/// One field of a provider's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub secret: bool,
}

/// A Leaf provider.
#[derive(Debug, PartialEq, Eq)]
pub struct Provider {
    /// credsync's name for it (`/v1` answers, database rows).
    pub name: &'static str,
    /// Leaf's path segment.
    pub segment: &'static str,
    /// Fields a create body must carry (all required, non-empty strings).
    pub create_fields: &'static [Field],
    /// Fields of Leaf's answer that are secret besides the create fields (e.g. `accessToken`).
    pub answer_secrets: &'static [&'static str],
    /// Leaf's key for this credential inside a user object (`climateFieldViewCredentials`).
    pub user_field: &'static str,
    /// Leaf's provider name in alerts.
    pub alert_name: &'static str,
}

impl Provider {
    pub fn is_secret(&self, field: &str) -> bool {
        self.create_fields
            .iter()
            .any(|f| f.secret && f.name == field)
            || self.answer_secrets.contains(&field)
    }

    /// Every secret field name, in a stable order (create fields first).
    pub fn secret_fields(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.create_fields
            .iter()
            .filter(|f| f.secret)
            .map(|f| f.name)
            .chain(self.answer_secrets.iter().copied())
    }

    pub fn create_field(&self, name: &str) -> Option<&Field> {
        self.create_fields.iter().find(|f| f.name == name)
    }
}

const fn secret(name: &'static str) -> Field {
    Field { name, secret: true }
}
const fn public(name: &'static str) -> Field {
    Field {
        name,
        secret: false,
    }
}

pub static CLIMATE_FIELD_VIEW: Provider = Provider {
    name: "climate-field-view",
    segment: "climate-field-view-credentials",
    create_fields: &[
        public("clientId"),
        secret("clientSecret"),
        secret("apiKey"),
        secret("refreshToken"),
    ],
    answer_secrets: &["accessToken"],
    user_field: "climateFieldViewCredentials",
    alert_name: "ClimateFieldView",
};

/// The providers this build serves. Climate FieldView is the one the contract requires.
pub static PROVIDERS: &[&Provider] = &[&CLIMATE_FIELD_VIEW];

pub fn provider_by_segment(segment: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().copied().find(|p| p.segment == segment)
}

pub fn provider_by_name(name: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().copied().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn climate_field_view_secrets_are_the_four_the_contract_names() {
        let p = provider_by_segment("climate-field-view-credentials").unwrap();
        let s: Vec<_> = p.secret_fields().collect();
        assert_eq!(s, ["clientSecret", "apiKey", "refreshToken", "accessToken"]);
        assert!(!p.is_secret("clientId"));
        assert!(provider_by_segment("john-deere-credentials").is_none());
    }
}
