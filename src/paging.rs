//! Leaf's list paging links: the JHipster `Link` header (`next`, `prev`, `last`, `first`) that
//! Leaf sends beside `X-Total-Count`. The simulator sends it as Leaf does, and credsync's
//! drop-in events route answers it for its own URL.

/// The `Link` header of page `page` (from 0) of `size` items out of `total`, for the list at
/// `base` (scheme, host and path); `kept` are the request's other query parameters.
pub fn link_header(
    base: &str,
    kept: &[(String, String)],
    page: u64,
    size: u64,
    total: u64,
) -> String {
    let kept: String = kept
        .iter()
        .filter(|(k, _)| k != "page" && k != "size")
        .map(|(k, v)| format!("{}={}&", encode_query_part(k), encode_query_part(v)))
        .collect();
    let link = |p: u64, rel: &str| format!("<{base}?{kept}page={p}&size={size}>; rel=\"{rel}\"");
    let total_pages = total.div_ceil(size.max(1));
    let mut parts = Vec::with_capacity(4);
    if page + 1 < total_pages {
        parts.push(link(page + 1, "next"));
    }
    if page > 0 {
        parts.push(link(page - 1, "prev"));
    }
    parts.push(link(total_pages.saturating_sub(1), "last"));
    parts.push(link(0, "first"));
    parts.join(",")
}

/// [`link_header`] for the list `req` asked for (its scheme, host and path).
pub fn link_header_for(
    req: &actix_web::HttpRequest,
    kept: &[(String, String)],
    page: u64,
    size: u64,
    total: u64,
) -> String {
    let conn = req.connection_info();
    let base = format!("{}://{}{}", conn.scheme(), conn.host(), req.path());
    link_header(&base, kept, page, size, total)
}

/// Percent-encoding of a query key or value (RFC 3986 unreserved characters kept).
fn encode_query_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_neighbours_the_last_and_the_first_page() {
        let kept = vec![
            ("sort".to_owned(), "createdDate,asc".to_owned()),
            ("page".to_owned(), "1".to_owned()),
        ];
        assert_eq!(
            link_header("http://h/e", &kept, 1, 10, 25),
            "<http://h/e?sort=createdDate%2Casc&page=2&size=10>; rel=\"next\",\
             <http://h/e?sort=createdDate%2Casc&page=0&size=10>; rel=\"prev\",\
             <http://h/e?sort=createdDate%2Casc&page=2&size=10>; rel=\"last\",\
             <http://h/e?sort=createdDate%2Casc&page=0&size=10>; rel=\"first\""
        );
        assert_eq!(
            link_header("http://h/e", &[], 0, 20, 0),
            "<http://h/e?page=0&size=20>; rel=\"last\",<http://h/e?page=0&size=20>; rel=\"first\""
        );
    }
}
