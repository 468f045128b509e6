//! Page frame numbers (the inflate and deflate queues' payload, 4 KiB
//! pages whatever the guest's page size) compacted into ranges, so that a
//! balloon of many MiB costs a few discards, not one per page.

/// The balloon's page size: the driver gives addresses shifted by 12.
pub const PAGE_SHIFT: u32 = 12;

/// Sorts `pfns` and returns the runs of consecutive frames as (first
/// frame, number of frames); repeated frames count once.
pub fn page_ranges(pfns: &mut [u32]) -> Vec<(u32, u32)> {
    pfns.sort_unstable();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &pfn in pfns.iter() {
        match ranges.last_mut() {
            Some((first, len)) if u64::from(*first) + u64::from(*len) == u64::from(pfn) => {
                *len += 1
            }
            Some((first, len)) if u64::from(*first) + u64::from(*len) > u64::from(pfn) => {}
            _ => ranges.push((pfn, 1)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_found_in_any_order_and_repeats_count_once() {
        assert_eq!(page_ranges(&mut []), vec![]);
        assert_eq!(
            page_ranges(&mut [7, 3, 4, 5, 9, 4, 8, u32::MAX]),
            vec![(3, 3), (7, 3), (u32::MAX, 1)]
        );
    }
}
