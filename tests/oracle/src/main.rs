//! keybroker's test oracle: the sev and kbs-types crates' own reading of JSON and bytes.
//!
//! Usage: `keybroker-oracle COMMAND < input`, one JSON answer on stdout:
//! - `snp-evidence`: SNP evidence JSON (`{"attestation_report", "cert_chain"}`) -> the report's
//!   bytes as each sev version encodes them, and the cert_chain entries' GUIDs and sizes;
//! - `snp-report`: a report's bytes (hex) -> each sev version's serde JSON of it;
//! - `kbs`: `{"request"?, "challenge"?, "attestation"?, "error"?, "response"?}` -> each read into
//!   kbs-types' struct and written again; for a response, also the AAD guest-components computes.
//! A value a crate refuses gives `{"error": "<why>"}` in its place.

use std::io::Read;

use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct SnpEvidence7 {
    attestation_report: sev7::firmware::guest::AttestationReport,
    cert_chain: Option<Vec<sev7::firmware::host::CertTableEntry>>,
}

#[derive(Deserialize)]
struct SnpEvidence6 {
    attestation_report: sev6::firmware::guest::AttestationReport,
    cert_chain: Option<Vec<sev6::firmware::host::CertTableEntry>>,
}

fn error(e: impl std::fmt::Display) -> Value {
    json!({ "error": e.to_string() })
}

fn snp_evidence(input: &Value) -> Value {
    use sev7::parser::ByteParser;
    let v7 = match serde_json::from_value::<SnpEvidence7>(input.clone()) {
        Err(e) => error(e),
        Ok(ev) => match ev.attestation_report.to_bytes() {
            Err(e) => error(e),
            Ok(bytes) => json!({
                "report": hex::encode(bytes),
                "cert_chain": ev.cert_chain.map(|c| c.iter()
                    .map(|e| json!([e.cert_type.to_string(), e.data.len()])).collect::<Vec<_>>()),
            }),
        },
    };
    let v6 = match serde_json::from_value::<SnpEvidence6>(input.clone()) {
        Err(e) => error(e),
        Ok(ev) => {
            let mut bytes = Vec::new();
            match ev.attestation_report.write_bytes(&mut bytes) {
                Err(e) => error(e),
                Ok(()) => json!({
                    "report": hex::encode(bytes),
                    "cert_chain": ev.cert_chain.map(|c| c.iter()
                        .map(|e| json!([e.cert_type.to_string(), e.data.len()])).collect::<Vec<_>>()),
                }),
            }
        }
    };
    json!({ "sev7": v7, "sev6": v6 })
}

fn snp_report(input: &Value) -> Value {
    use sev7::parser::ByteParser;
    let bytes = match input.as_str().map(hex::decode) {
        Some(Ok(bytes)) => bytes,
        _ => return error("input must be a hex string"),
    };
    let v7 = match sev7::firmware::guest::AttestationReport::from_bytes(&bytes) {
        Err(e) => error(e),
        Ok(report) => serde_json::to_value(report).unwrap_or_else(error),
    };
    let v6 = match sev6::firmware::guest::AttestationReport::from_bytes(&bytes) {
        Err(e) => error(e),
        Ok(report) => serde_json::to_value(report).unwrap_or_else(error),
    };
    json!({ "sev7": v7, "sev6": v6 })
}

fn again<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> Value {
    match serde_json::from_value::<T>(value.clone()) {
        Err(e) => error(e),
        Ok(typed) => serde_json::to_value(typed).unwrap_or_else(error),
    }
}

fn kbs(input: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(v) = input.get("request") {
        out.insert("request".into(), again::<kbs_types::Request>(v));
    }
    if let Some(v) = input.get("challenge") {
        out.insert("challenge".into(), again::<kbs_types::Challenge>(v));
    }
    if let Some(v) = input.get("attestation") {
        out.insert("attestation".into(), again::<kbs_types::Attestation>(v));
    }
    if let Some(v) = input.get("error") {
        out.insert("error".into(), again::<kbs_types::ErrorInformation>(v));
    }
    if let Some(v) = input.get("response") {
        let answer = match serde_json::from_value::<kbs_types::Response>(v.clone()) {
            Err(e) => error(e),
            Ok(response) => match response.protected.generate_aad() {
                Err(e) => error(e),
                Ok(aad) => json!({ "aad": String::from_utf8_lossy(&aad) }),
            },
        };
        out.insert("response".into(), answer);
    }
    Value::Object(out)
}

fn main() {
    let command = std::env::args().nth(1).unwrap_or_default();
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).expect("read stdin");
    let input: Value = serde_json::from_str(&text).expect("stdin must be JSON");
    let answer = match command.as_str() {
        "snp-evidence" => snp_evidence(&input),
        "snp-report" => snp_report(&input),
        "kbs" => kbs(&input),
        _ => {
            eprintln!("usage: keybroker-oracle snp-evidence|snp-report|kbs < input.json");
            std::process::exit(2);
        }
    };
    println!("{answer}");
}
