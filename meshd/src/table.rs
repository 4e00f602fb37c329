//! Plain-text tables as kubectl prints them: columns padded to their
//! widest cell, two spaces apart, no trailing blanks. Used by meshctl and
//! by meshlab's status.

/// `rows` (the header first) as aligned text, one line each.
pub fn render<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.as_ref().get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_and_lines_end_clean() {
        let rows = [
            ["NODE".to_string(), "PATH".to_string()],
            ["node-10".to_string(), String::new()],
        ];
        assert_eq!(super::render(&rows), "NODE     PATH\nnode-10\n");
    }
}
