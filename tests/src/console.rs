//! Reading the probe guest's console as the tests see it: only whole
//! lines count (the harness may see the last one in pieces).

/// The whole lines of `output`, trimmed.
pub fn whole_lines(output: &str) -> impl Iterator<Item = &str> {
    output
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim)
}

/// The numbers after `prefix` (up to a comma) on the whole lines that
/// start with it, in order: `numbers(out, "probe.tick=")`.
pub fn numbers(output: &str, prefix: &str) -> Vec<u64> {
    whole_lines(output)
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|n| n.split(',').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_does_not_count() {
        let out = "probe.tick=1\nprobe.memtest=ok,1\nprobe.tick=2\nprobe.ti";
        assert_eq!(numbers(out, "probe.tick="), [1, 2]);
        assert_eq!(numbers(out, "probe.memtest=ok,"), [1]);
        assert_eq!(whole_lines(out).count(), 3);
    }
}
