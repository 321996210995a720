//! The client side of authentication: every call carries `authorization: Bearer <token>`.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// A tonic interceptor that adds the bearer token to every request (none: the request
/// goes out unauthenticated and the server answers UNAUTHENTICATED).
#[derive(Debug, Clone, Default)]
pub struct BearerToken {
    header: Option<MetadataValue<Ascii>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token contains characters that cannot be sent in a gRPC header")]
pub struct InvalidTokenText;

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidTokenText> {
        let header = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| InvalidTokenText)
            })
            .transpose()?;
        Ok(Self { header })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, header.clone());
        }
        Ok(request)
    }
}

/// Reads the token out of an `authorization` header value ("Bearer <token>", scheme
/// case-insensitive). None when the header is not a bearer credential.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn interceptor_adds_the_header() {
        let mut with = BearerToken::new(Some("t0k")).expect("ascii");
        let req = with.call(Request::new(())).expect("ok");
        assert_eq!(
            req.metadata().get(AUTHORIZATION).map(|v| v.to_str().ok()),
            Some(Some("Bearer t0k"))
        );
        let mut without = BearerToken::default();
        let req = without.call(Request::new(())).expect("ok");
        assert!(req.metadata().get(AUTHORIZATION).is_none());
        assert!(BearerToken::new(Some("bad\ntoken")).is_err());
    }
}
