//! The OTLP/gRPC sink: opentelemetry-otlp's `SpanExporter` over tonic, gzip by default. (HTTP/
//! protobuf has its own sink, `otlp_http.rs`; the endpoint checks here serve both.)
//!
//! Resources: opentelemetry-otlp's exporter carries one resource at a time (`set_resource`), and
//! each traced process has its own. So each batch is grouped by process and every group goes out
//! as its own request with its own `ResourceSpans`: a batch with spans of N processes becomes N
//! requests. `set_resource` is skipped while consecutive groups (also across batches) belong to
//! the same process. The resource is sent as given: the exporter adds no `telemetry.sdk.*` of
//! its own, so the agent's name set by the span stage arrives.
//!
//! Retries are ours (see `worker.rs`), so opentelemetry-otlp's own retry is disabled: one call
//! here is one request per group.

use std::collections::VecDeque;

use hyper::Uri;
use opentelemetry_otlp::{
    Compression, RetryPolicy, SpanExporter, WithExportConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::SpanExporter as _;

use super::worker::{ResourceGroup, SinkError};
use super::{ExportError, OtlpCompression, OtlpProtocol, Shared};

/// Path of the traces endpoint on an OTLP/HTTP collector.
pub(super) const HTTP_TRACES_PATH: &str = "/v1/traces";

/// Checks that `endpoint` (from `origin`, an option or variable name) is an `http://` URL with a
/// host. TLS is not built in, so `https://` is refused here rather than failing on every export.
pub(super) fn check_endpoint(endpoint: &str, origin: &str) -> Result<Uri, ExportError> {
    let invalid = |reason: String| ExportError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        origin: origin.to_owned(),
        reason,
    };
    let uri: Uri = endpoint.trim().parse().map_err(|error| {
        invalid(format!(
            "{error}; pass a URL such as http://localhost:4317 (grpc) or http://localhost:4318 \
             (http/protobuf)"
        ))
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(invalid(
                "this build has no TLS; send to a collector over http:// (for example an \
                 OpenTelemetry Collector on this host that forwards over TLS)"
                    .to_owned(),
            ));
        }
        Some(other) => {
            return Err(invalid(format!(
                "unsupported scheme {other:?}; use http://host:port"
            )));
        }
        None => {
            return Err(invalid(format!(
                "the scheme is missing; write http://{}",
                endpoint.trim()
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(
            "the host is missing; use http://host:port".to_owned(),
        ));
    }
    Ok(uri)
}

/// The URL for an endpoint passed as an option: a base URL (no path) gets `/v1/traces` for
/// HTTP, as `OTEL_EXPORTER_OTLP_ENDPOINT` would.
pub(super) fn endpoint_url(protocol: OtlpProtocol, endpoint: &str) -> Result<String, ExportError> {
    let uri = check_endpoint(endpoint, "the OTLP endpoint option")?;
    let endpoint = endpoint.trim();
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf if matches!(uri.path(), "" | "/") => {
            format!("{}{HTTP_TRACES_PATH}", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    })
}

pub(super) struct OtlpSink {
    exporter: SpanExporter,
    /// The process whose resource the exporter carries now.
    current_resource: Option<u64>,
}

impl std::fmt::Debug for OtlpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSink")
            .field("current_resource", &self.current_resource)
            .finish_non_exhaustive()
    }
}

impl OtlpSink {
    /// Builds the gRPC exporter. With `endpoint` None, opentelemetry-otlp reads the endpoint
    /// variables; headers and the request timeout always come from its variables.
    pub fn build_grpc(
        endpoint: Option<&str>,
        compression: OtlpCompression,
    ) -> Result<Self, ExportError> {
        let endpoint = endpoint
            .map(|e| endpoint_url(OtlpProtocol::Grpc, e))
            .transpose()?;
        let mut builder = SpanExporter::builder()
            .with_tonic()
            .with_retry_policy(RetryPolicy::disabled());
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        // Uncompressed: leave it to the variables, which say "none" in that case.
        if compression == OtlpCompression::Gzip {
            builder = builder.with_compression(Compression::Gzip);
        }
        let built = builder.build();
        let exporter = built.map_err(|error| ExportError::OtlpSetup { error })?;
        Ok(Self {
            exporter,
            current_resource: None,
        })
    }

    pub async fn export(
        &mut self,
        groups: &mut VecDeque<ResourceGroup>,
        shared: &Shared,
    ) -> Result<(), SinkError> {
        while let Some(group) = groups.front() {
            if self.current_resource != Some(group.resource_id) {
                self.exporter.set_resource(&group.resource);
                self.current_resource = Some(group.resource_id);
            }
            // A copy, because a failed request is retried with the same spans.
            let spans = group.spans.clone();
            let count = spans.len();
            self.exporter.export(spans).await.map_err(classify)?;
            groups.pop_front();
            shared.delivered(count, 1);
        }
        Ok(())
    }

    pub fn finish(&mut self) {
        if let Err(error) = self.exporter.shutdown() {
            log::debug!("closing the OTLP exporter: {error}");
        }
    }
}

/// Whether a failed request is worth retrying, following the OTLP specification: gRPC
/// CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and
/// DATA_LOSS are; any other answer is final.
///
/// opentelemetry-otlp reports failures only as text (`OTelSdkError::InternalFailure`), so the
/// status is read from its messages ("... gRPC code: Unavailable ..."); a message in another
/// shape (a transport error) counts as transient, so a wording change costs retries, not data.
fn classify(error: OTelSdkError) -> SinkError {
    let message = error.to_string();
    let permanent = match &error {
        OTelSdkError::AlreadyShutdown => true,
        OTelSdkError::Timeout(_) => false,
        OTelSdkError::InternalFailure(text) => is_permanent_failure(text),
    };
    SinkError { permanent, message }
}

fn is_permanent_failure(text: &str) -> bool {
    if let Some(rest) = text.split("gRPC code: ").nth(1) {
        let code: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        return !matches!(
            code.as_str(),
            "Cancelled"
                | "DeadlineExceeded"
                | "ResourceExhausted"
                | "Aborted"
                | "OutOfRange"
                | "Unavailable"
                | "DataLoss"
        );
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_otlp_rules() {
        for (text, permanent) in [
            (
                "TonicTracesClient export failed with gRPC code: Unavailable: transport error",
                false,
            ),
            (
                "TonicTracesClient export failed with gRPC code: InvalidArgument",
                true,
            ),
            (
                "TonicTracesClient export failed with gRPC code: Unauthenticated",
                true,
            ),
            (
                "TonicTracesClient export failed with gRPC code: ResourceExhausted",
                false,
            ),
            ("TonicTracesClient export failed: transport error", false),
            ("something new", false),
        ] {
            assert_eq!(is_permanent_failure(text), permanent, "{text}");
        }
    }

    #[test]
    fn endpoints_are_checked_and_completed() {
        assert_eq!(
            endpoint_url(OtlpProtocol::HttpProtobuf, "http://c:4318").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            endpoint_url(OtlpProtocol::HttpProtobuf, "http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            endpoint_url(OtlpProtocol::HttpProtobuf, "http://c:4318/custom").unwrap(),
            "http://c:4318/custom"
        );
        assert_eq!(
            endpoint_url(OtlpProtocol::Grpc, "http://c:4317").unwrap(),
            "http://c:4317"
        );
        for bad in [
            "c:4317",
            "https://c:4317",
            "ftp://c",
            "http://",
            "not a url",
        ] {
            let error = endpoint_url(OtlpProtocol::Grpc, bad).unwrap_err();
            assert!(
                matches!(error, ExportError::InvalidEndpoint { .. }),
                "{bad}: {error}"
            );
        }
    }
}
