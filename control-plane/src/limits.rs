//! The request-size limit's status. tonic refuses an oversized message with
//! OUT_OF_RANGE; gRPC's own servers (and AIP-193) say RESOURCE_EXHAUSTED for a request
//! larger than the server accepts, so the response is rewritten to that, naming the
//! limit. Only the status header of tonic's own refusal is touched.

use http::{HeaderValue, Response};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
/// tonic's message for a request over `max_decoding_message_size`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

#[derive(Debug, Clone)]
pub struct RequestTooLarge {
    message: HeaderValue,
}

impl RequestTooLarge {
    pub fn new(max_request_bytes: usize) -> Self {
        let text =
            format!("request too large: the limit max-request-bytes is {max_request_bytes} bytes");
        Self {
            message: HeaderValue::from_str(&text).expect("ASCII text is a valid header value"),
        }
    }

    pub fn rewrite<B>(&self, mut response: Response<B>) -> Response<B> {
        let headers = response.headers_mut();
        let out_of_range = headers.get(GRPC_STATUS).is_some_and(|v| v == "11");
        let from_decoder = headers
            .get(GRPC_MESSAGE)
            .and_then(|v| v.to_str().ok())
            .map(|m| m.replace("%20", " "))
            .is_some_and(|m| m.starts_with(TONIC_TOO_LARGE));
        if out_of_range && from_decoder {
            headers.insert(GRPC_STATUS, HeaderValue::from_static("8"));
            headers.insert(GRPC_MESSAGE, self.message.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, message: &str) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert(GRPC_STATUS, HeaderValue::from_str(status).expect("ascii"));
        r.headers_mut()
            .insert(GRPC_MESSAGE, HeaderValue::from_str(message).expect("ascii"));
        r
    }

    #[test]
    fn only_the_decoders_refusal_is_rewritten() {
        let limit = RequestTooLarge::new(1024);
        let r = limit.rewrite(response(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205000%20bytes",
        ));
        assert_eq!(r.headers()[GRPC_STATUS], "8");
        assert!(r.headers()[GRPC_MESSAGE]
            .to_str()
            .expect("ascii")
            .contains("max-request-bytes is 1024"));
        let other = limit.rewrite(response("11", "page out of range"));
        assert_eq!(other.headers()[GRPC_STATUS], "11");
        let ok = limit.rewrite(Response::new(()));
        assert!(ok.headers().get(GRPC_STATUS).is_none());
    }
}
