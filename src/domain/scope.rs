//! Caller scopes (SPEC §3).

/// One scope a caller token may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    CredentialsRead,
    CredentialsReveal,
    CredentialsWrite,
    CredentialsDelete,
    StatusRead,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CredentialsRead => "credentials:read",
            Scope::CredentialsReveal => "credentials:reveal",
            Scope::CredentialsWrite => "credentials:write",
            Scope::CredentialsDelete => "credentials:delete",
            Scope::StatusRead => "status:read",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "credentials:read" => Scope::CredentialsRead,
            "credentials:reveal" => Scope::CredentialsReveal,
            "credentials:write" => Scope::CredentialsWrite,
            "credentials:delete" => Scope::CredentialsDelete,
            "status:read" => Scope::StatusRead,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }
}

/// The scopes a caller holds (unknown scope strings are ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn from_strs<'a>(items: impl IntoIterator<Item = &'a str>) -> Scopes {
        let mut bits = 0u8;
        for s in items {
            if let Some(scope) = Scope::parse(s) {
                bits |= 1 << scope as u8;
            }
        }
        Scopes(bits)
    }

    fn has(self, s: Scope) -> bool {
        self.0 & (1 << s as u8) != 0
    }

    /// Whether the caller may use a route needing `needed`: `admin` opens every route,
    /// `credentials:reveal` implies `credentials:read`.
    pub fn allows(self, needed: Scope) -> bool {
        if self.has(Scope::Admin) || self.has(needed) {
            return true;
        }
        needed == Scope::CredentialsRead && self.has(Scope::CredentialsReveal)
    }

    /// Secrets in clear text need `credentials:reveal` itself; `admin` alone does not reveal.
    pub fn may_reveal(self) -> bool {
        self.has(Scope::CredentialsReveal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_opens_routes_but_does_not_reveal() {
        let s = Scopes::from_strs(["admin"]);
        assert!(s.allows(Scope::CredentialsWrite) && s.allows(Scope::StatusRead));
        assert!(!s.may_reveal());
    }

    #[test]
    fn reveal_implies_read_only() {
        let s = Scopes::from_strs(["credentials:reveal", "bogus"]);
        assert!(s.allows(Scope::CredentialsRead) && s.may_reveal());
        assert!(!s.allows(Scope::CredentialsWrite) && !s.allows(Scope::StatusRead));
    }
}
