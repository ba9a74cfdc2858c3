//! The JSON-lines sink: each batch becomes one OTLP/JSON `ExportTraceServiceRequest` on one
//! line, appended to the `--output` file (or stdout) and flushed.
//!
//! The encoding is opentelemetry-proto's (`with-serde`), which follows the OTLP/JSON rules:
//! lowerCamelCase field names, trace and span ids as hex strings (not base64), enums (span kind,
//! status code) as integers, 64-bit integers (timestamps, `intValue`) as decimal strings. Each
//! process of the batch is one `ResourceSpans`.

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::worker::{ResourceGroup, SinkError};
use super::{ExportError, Shared};

/// The OTLP request for spans grouped by process: one `ResourceSpans` per `(resource, spans)`.
pub fn encode_request<'a>(
    groups: impl IntoIterator<Item = (&'a Resource, Vec<SpanData>)>,
) -> ExportTraceServiceRequest {
    let resource_spans = groups
        .into_iter()
        .flat_map(|(resource, spans)| {
            group_spans_by_resource_and_scope(spans, &ResourceAttributesWithSchema::from(resource))
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

pub(super) struct JsonlSink {
    out: Pin<Box<dyn AsyncWrite + Send>>,
    /// For messages: the path, or "stdout".
    name: String,
}

impl std::fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlSink")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl JsonlSink {
    /// Opens `path` for appending (created if missing; appending keeps earlier runs), or stdout.
    /// Opening is a quick local call, done synchronously so a bad path fails at start.
    pub fn open(path: Option<&Path>) -> Result<Self, ExportError> {
        Ok(match path {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| ExportError::OpenOutput {
                        path: path.to_owned(),
                        error,
                    })?;
                Self {
                    out: Box::pin(tokio::fs::File::from_std(file)),
                    name: path.display().to_string(),
                }
            }
            None => Self {
                out: Box::pin(tokio::io::stdout()),
                name: "stdout".to_owned(),
            },
        })
    }

    pub async fn export(
        &mut self,
        groups: &mut VecDeque<ResourceGroup>,
        shared: &Shared,
    ) -> Result<(), SinkError> {
        let count = groups.iter().map(|group| group.spans.len()).sum();
        let request = encode_request(
            groups
                .iter()
                .map(|group| (group.resource.as_ref(), group.spans.clone())),
        );
        let mut line = serde_json::to_vec(&request).map_err(|error| SinkError {
            permanent: true,
            message: format!("cannot encode spans as OTLP/JSON: {error}"),
        })?;
        line.push(b'\n');
        // A failed write may have left part of a line: retrying could duplicate spans, and
        // local write errors (disk full, closed pipe) rarely heal, so a failure is final.
        let written = async {
            self.out.write_all(&line).await?;
            self.out.flush().await
        }
        .await;
        written.map_err(|error| SinkError {
            permanent: true,
            message: format!("cannot write spans to {}: {error}", self.name),
        })?;
        groups.clear();
        shared.delivered(count, 1);
        Ok(())
    }

    pub async fn finish(&mut self) {
        if let Err(error) = self.out.flush().await {
            log::warn!("cannot flush {}: {error}", self.name);
        }
    }
}
