//! The simulator's table of Leaf providers (segment, alert name, user-object key, create
//! fields, scopes), copied from `LEAF-API.md`. Data only: adding a provider is one row.

/// One Leaf provider.
#[derive(Debug)]
pub(crate) struct Provider {
    /// Path segment, e.g. `climate-field-view-credentials`.
    pub segment: &'static str,
    /// Name used in alerts, e.g. `ClimateFieldView`.
    pub name: &'static str,
    /// Key of the credential inside a user object, e.g. `climateFieldViewCredentials`.
    pub user_key: &'static str,
    /// Required create fields, in Leaf's order.
    pub fields: &'static [&'static str],
    /// Scopes reported in `tokenMetadata`.
    pub scopes: &'static [&'static str],
}

const OAUTH_SCOPES: &[&str] = &["fields:read", "files:read", "operations:read", "offline"];

/// Every provider Leaf documents.
pub(crate) static PROVIDERS: &[Provider] = &[
    Provider {
        segment: "climate-field-view-credentials",
        name: "ClimateFieldView",
        user_key: "climateFieldViewCredentials",
        fields: &["clientId", "clientSecret", "apiKey", "refreshToken"],
        scopes: &[
            "fields:read",
            "asPlanted:read",
            "asHarvested:read",
            "asApplied:read",
            "imagery:read",
            "platform",
        ],
    },
    Provider {
        segment: "john-deere-credentials",
        name: "JohnDeere",
        user_key: "johnDeereCredentials",
        fields: &[
            "clientKey",
            "clientSecret",
            "refreshToken",
            "clientEnvironment",
        ],
        scopes: &["ag1", "ag2", "ag3", "eq1", "files", "offline_access"],
    },
    Provider {
        segment: "cnhi-credentials",
        name: "CNHI",
        user_key: "cnhiCredentials",
        fields: &[
            "clientId",
            "clientSecret",
            "subscriptionKey",
            "refreshToken",
            "clientEnvironment",
        ],
        scopes: &["offline_access"],
    },
    Provider {
        segment: "trimble-credentials",
        name: "Trimble",
        user_key: "trimbleCredentials",
        fields: &["clientId", "clientSecret", "refreshToken"],
        scopes: OAUTH_SCOPES,
    },
    Provider {
        segment: "raven-credentials",
        name: "Raven",
        user_key: "ravenCredentials",
        fields: &["clientId", "clientSecret", "refreshToken"],
        scopes: OAUTH_SCOPES,
    },
    Provider {
        segment: "raven-slingshot-credentials",
        name: "RavenSlingshot",
        user_key: "ravenSlingshotCredentials",
        fields: &["apiKey", "accessKey", "sharedSecret"],
        scopes: &[],
    },
    Provider {
        segment: "ag-leader-credentials",
        name: "AgLeader",
        user_key: "agLeaderCredentials",
        fields: &["refreshToken", "publicKey", "privateKey"],
        scopes: OAUTH_SCOPES,
    },
    Provider {
        segment: "lindsay-credentials",
        name: "Lindsay",
        user_key: "lindsayCredentials",
        fields: &[
            "clientId",
            "clientSecret",
            "refreshToken",
            "clientEnvironment",
        ],
        scopes: OAUTH_SCOPES,
    },
    Provider {
        segment: "stara-credentials",
        name: "Stara",
        user_key: "staraCredentials",
        fields: &["apiKey", "accessToken", "accessTokenClient", "refreshToken"],
        scopes: &[],
    },
    Provider {
        segment: "valley-credentials",
        name: "Valley",
        user_key: "valleyCredentials",
        fields: &[
            "apid",
            "initializationVector",
            "key",
            "username",
            "password",
        ],
        scopes: &[],
    },
    Provider {
        segment: "sentera-credentials",
        name: "Sentera",
        user_key: "senteraCredentials",
        fields: &["username", "password", "organizationName"],
        scopes: &[],
    },
    Provider {
        segment: "agvance-credentials",
        name: "Agvance",
        user_key: "agvanceCredentials",
        fields: &[
            "apiKey",
            "clientEnvironment",
            "databaseId",
            "password",
            "username",
        ],
        scopes: &[],
    },
    Provider {
        segment: "claas-credentials",
        name: "CLAAS",
        user_key: "claasCredentials",
        fields: &[
            "clientKey",
            "clientSecret",
            "refreshToken",
            "clientEnvironment",
        ],
        scopes: OAUTH_SCOPES,
    },
];

/// The provider index for a path segment.
pub(crate) fn by_segment(segment: &str) -> Option<usize> {
    PROVIDERS.iter().position(|p| p.segment == segment)
}

/// The default provider (Climate FieldView).
pub(crate) const DEFAULT_SEGMENT: &str = "climate-field-view-credentials";

/// Valid values of `clientEnvironment`, where a provider has it.
pub(crate) const CLIENT_ENVIRONMENTS: &[&str] = &["STAGE", "PRODUCTION"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_are_the_camel_case_segment() {
        for p in PROVIDERS {
            let stem = p.segment.trim_end_matches("-credentials");
            let mut key = String::new();
            let mut upper = false;
            for c in stem.chars() {
                if c == '-' {
                    upper = true;
                } else if upper {
                    key.push(c.to_ascii_uppercase());
                    upper = false;
                } else {
                    key.push(c);
                }
            }
            key.push_str("Credentials");
            assert_eq!(p.user_key, key);
        }
    }
}
