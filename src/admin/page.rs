//! The status page at `/`: one HTML document with its style and script
//! inline and nothing from elsewhere, which draws `/api/pools` every two
//! seconds. Read-only: it has no form and sends nothing but `GET`.
//!
//! The Content-Security-Policy allows exactly the inline style and script
//! served (by their SHA-256), fetches to this origin, and nothing else, so
//! that a backend name or a probe's reason cannot become markup or code
//! even if the script had a bug.

use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};

pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

const SHELL: &str = include_str!("page/status.html");
const STYLE: &str = include_str!("page/status.css");
const SCRIPT: &str = include_str!("page/status.js");

static PAGE: LazyLock<(Bytes, HeaderValue)> = LazyLock::new(|| {
    let html = SHELL
        .replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT);
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
    };
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    );
    (
        Bytes::from(html),
        HeaderValue::from_str(&policy).expect("base64 and ASCII"),
    )
});

/// The page.
pub fn html() -> Bytes {
    PAGE.0.clone()
}

/// Its Content-Security-Policy.
pub fn policy() -> HeaderValue {
    PAGE.1.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_its_style_and_script_and_the_policy_names_them() {
        let html = std::str::from_utf8(&PAGE.0).unwrap();
        assert!(html.contains(&format!("<script>{SCRIPT}</script>")));
        assert!(html.contains(&format!("<style>{STYLE}</style>")));
        assert!(!html.contains("src=") && !html.contains("http://") && !html.contains("https://"));
        let policy = policy();
        let policy = policy.to_str().unwrap();
        assert!(policy.starts_with("default-src 'none'; script-src 'sha256-"));
    }
}
