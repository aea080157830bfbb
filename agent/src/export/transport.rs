//! One OTLP export request over gRPC or HTTP/protobuf, and what its answer means for retrying
//! (the OTLP specification's rules: which failures are transient, throttling hints, partial
//! success).

use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_client::TraceServiceClient, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, Endpoint},
    Code,
};

use super::{OtlpConfig, Protocol};

/// What the backend's answer means for the batch.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// Taken, except `rejected` spans the backend refused for good (OTLP partial success).
    Accepted { rejected: u64, message: String },
    /// A transient failure: send the same request again later, not before `after` if the
    /// backend said so.
    Retry { after: Option<Duration>, reason: String },
    /// The backend will never take this request (bad request, unauthenticated, ...).
    Rejected { reason: String },
}

/// Cheap to clone: clones share one gRPC channel or one HTTP connection pool.
#[derive(Clone)]
pub(super) enum Client {
    Grpc { client: TraceServiceClient<Channel>, metadata: MetadataMap },
    Http { client: reqwest::Client, endpoint: String, headers: reqwest::header::HeaderMap },
}

impl Client {
    /// Must run inside a tokio runtime: the lazy gRPC channel spawns its worker.
    pub(super) fn new(config: &OtlpConfig) -> Result<Self, String> {
        Ok(match config.protocol {
            Protocol::Grpc => {
                let endpoint = Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| format!("invalid gRPC endpoint {:?}: {e}", config.endpoint))?;
                let channel = endpoint.timeout(config.timeout).connect_timeout(config.timeout).connect_lazy();
                Client::Grpc { client: TraceServiceClient::new(channel), metadata: grpc_metadata(&config.headers) }
            }
            Protocol::HttpProtobuf => Client::Http {
                client: reqwest::Client::builder()
                    .timeout(config.timeout)
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
                endpoint: config.endpoint.clone(),
                headers: http_headers(&config.headers),
            },
        })
    }

    pub(super) async fn send(&self, request: &ExportTraceServiceRequest) -> Outcome {
        match self {
            Client::Grpc { client, metadata } => {
                let mut call = tonic::Request::new(request.clone());
                *call.metadata_mut() = metadata.clone();
                match client.clone().export(call).await {
                    Ok(response) => accepted(response.into_inner()),
                    Err(status) => grpc_failure(&status),
                }
            }
            Client::Http { client, endpoint, headers } => {
                let sent = client
                    .post(endpoint)
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(request.encode_to_vec())
                    .send()
                    .await;
                match sent {
                    Ok(response) => http_outcome(response).await,
                    // Connection refused or reset, timeouts: the backend may come back.
                    Err(e) => Outcome::Retry { after: None, reason: e.to_string() },
                }
            }
        }
    }
}

fn accepted(response: ExportTraceServiceResponse) -> Outcome {
    let partial = response.partial_success.unwrap_or_default();
    Outcome::Accepted { rejected: u64::try_from(partial.rejected_spans).unwrap_or(0), message: partial.error_message }
}

/// The OTLP/gRPC retryable codes. RESOURCE_EXHAUSTED is retried too: collectors answer it
/// when their queue is full, which passes.
fn grpc_failure(status: &tonic::Status) -> Outcome {
    let reason = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Outcome::Retry { after: grpc_retry_delay(status.details()), reason },
        _ => Outcome::Rejected { reason },
    }
}

/// `google.rpc.Status` and `google.rpc.RetryInfo`, the parts a throttling hint lives in.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<google::Any>,
}

#[derive(Clone, PartialEq, Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<google::Duration>,
}

/// The two protobuf well-known types these need, declared here rather than pulling in a crate.
mod google {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

fn grpc_retry_delay(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status.details.iter().find(|any| any.type_url == RETRY_INFO_TYPE)?;
    let delay = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    Some(Duration::from_secs(seconds) + Duration::from_nanos(u64::try_from(delay.nanos).unwrap_or(0)))
}

async fn http_outcome(response: reqwest::Response) -> Outcome {
    let status = response.status();
    if status.is_success() {
        // An empty body is a full success; a body that does not decode is not worth failing for.
        let body = response.bytes().await.unwrap_or_default();
        return accepted(ExportTraceServiceResponse::decode(body).unwrap_or_default());
    }
    let reason = format!("HTTP {status}");
    match status.as_u16() {
        429 | 502 | 503 | 504 => {
            let after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            Outcome::Retry { after, reason }
        }
        _ => Outcome::Rejected { reason },
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn grpc_metadata(headers: &[(String, String)]) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for (key, value) in headers {
        match (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
            (Ok(k), Ok(v)) => {
                metadata.insert(k, v);
            }
            _ => log::warn!("OTLP header {key:?} is not valid ASCII gRPC metadata, not sent"),
        }
    }
    metadata
}

fn http_headers(headers: &[(String, String)]) -> reqwest::header::HeaderMap {
    let mut map = reqwest::header::HeaderMap::new();
    for (key, value) in headers {
        match (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(value),
        ) {
            (Ok(k), Ok(v)) => {
                map.insert(k, v);
            }
            _ => log::warn!("OTLP header {key:?} is not a valid HTTP header, not sent"),
        }
    }
    map
}

/// Headers by name, for tests that check what was sent.
#[cfg(test)]
pub(super) fn header_names(client: &Client) -> std::collections::HashMap<String, String> {
    match client {
        Client::Grpc { metadata, .. } => metadata
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        Client::Http { headers, .. } => {
            headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned())).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn grpc_codes_and_retry_info() {
        let retry_info = RetryInfo { retry_delay: Some(google::Duration { seconds: 2, nanos: 500_000_000 }) };
        let details = RpcStatus {
            details: vec![google::Any { type_url: RETRY_INFO_TYPE.into(), value: retry_info.encode_to_vec() }],
        }
        .encode_to_vec();
        let throttled = tonic::Status::with_details(Code::ResourceExhausted, "queue full", details.into());
        assert_eq!(
            grpc_failure(&throttled),
            Outcome::Retry { after: Some(Duration::from_millis(2500)), reason: "gRPC ResourceExhausted: queue full".into() }
        );
        assert!(matches!(grpc_failure(&tonic::Status::unavailable("down")), Outcome::Retry { after: None, .. }));
        assert!(matches!(grpc_failure(&tonic::Status::invalid_argument("bad")), Outcome::Rejected { .. }));
        assert!(matches!(grpc_failure(&tonic::Status::unauthenticated("who")), Outcome::Rejected { .. }));
    }

    #[tokio::test]
    async fn header_values_are_sent_as_given() {
        let config = |protocol| OtlpConfig {
            endpoint: "http://127.0.0.1:1".into(),
            protocol,
            headers: vec![("x-api-key".into(), "50% off".into()), ("bad key".into(), "v".into())],
            timeout: Duration::from_secs(1),
            queue_size: 8,
            batch_size: 8,
        };
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let names = header_names(&Client::new(&config(protocol)).unwrap());
            assert_eq!(names.get("x-api-key").map(String::as_str), Some("50% off"), "{protocol}");
            assert_eq!(names.len(), 1, "{protocol}: {names:?}");
        }
    }
}
