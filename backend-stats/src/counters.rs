//! The counters of each device kind, named as in Firecracker's metrics
//! where Firecracker has the counter.

/// The counters of one device kind, each at a fixed slot of the page.
pub trait CounterSet: Copy {
    /// The metrics keys, in slot order.
    const KEYS: &'static [&'static str];
    /// The counter's slot in the page.
    fn slot(self) -> usize;
}

/// Declares a device kind's counters: an enum whose variant order is the
/// slot order, with each variant's metrics key.
macro_rules! counter_set {
    ($(#[$doc:meta])* $set:ident { $($(#[$what:meta])* $counter:ident = $key:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $set {
            $($(#[$what])* $counter,)+
        }

        impl CounterSet for $set {
            const KEYS: &'static [&'static str] = &[$($key,)+];

            fn slot(self) -> usize {
                self as usize
            }
        }
    };
}

counter_set! {
    /// A vhost-user-blk backend's counters.
    BlockCounter {
        /// Kicks of any request queue.
        QueueEventCount = "queue_event_count",
        ReadCount = "read_count",
        ReadBytes = "read_bytes",
        WriteCount = "write_count",
        WriteBytes = "write_bytes",
        FlushCount = "flush_count",
        /// Discard and write-zeroes requests.
        DiscardCount = "discard_count",
        /// Requests the backend could not parse (answered UNSUPP or IOERR).
        InvalidReqsCount = "invalid_reqs_count",
        /// Requests the disk failed (answered IOERR).
        ExecuteFails = "execute_fails",
        /// Queues the guest broke (the device needs a reset).
        EventFails = "event_fails",
        /// Times a request's debt to the rate limiter held the queues back.
        RateLimiterThrottledEvents = "rate_limiter_throttled_events",
        /// Wake-ups of a worker by the rate limiter's timer.
        RateLimiterEventCount = "rate_limiter_event_count",
    }
}

counter_set! {
    /// A vhost-user-net backend's counters.
    NetCounter {
        /// Kicks of an RX queue (the guest posted buffers).
        RxQueueEventCount = "rx_queue_event_count",
        /// The TAP had frames to read.
        RxTapEventCount = "rx_tap_event_count",
        RxBytesCount = "rx_bytes_count",
        RxPacketsCount = "rx_packets_count",
        /// Times RX stopped because the guest's buffers ran out.
        NoRxAvailBuffer = "no_rx_avail_buffer",
        /// Frames dropped on the way to the guest, and RX buffers refused
        /// (malformed chains).
        RxFails = "rx_fails",
        TapReadFails = "tap_read_fails",
        /// Kicks of a TX queue.
        TxQueueEventCount = "tx_queue_event_count",
        TxBytesCount = "tx_bytes_count",
        TxPacketsCount = "tx_packets_count",
        /// Frames from the guest that were not valid (dropped).
        TxMalformedFrames = "tx_malformed_frames",
        TapWriteFails = "tap_write_fails",
        /// Queues the guest broke (the device needs a reset).
        EventFails = "event_fails",
        /// Frames to the guest that left the RX limiter in debt (the next
        /// wait for its timer).
        RxRateLimiterThrottled = "rx_rate_limiter_throttled",
        /// Wake-ups by the RX limiter's timer.
        RxEventRateLimiterCount = "rx_event_rate_limiter_count",
        /// Frames from the guest that left the TX limiter in debt.
        TxRateLimiterThrottled = "tx_rate_limiter_throttled",
        /// Wake-ups by the TX limiter's timer.
        TxRateLimiterEventCount = "tx_rate_limiter_event_count",
        // MMDS (the VMM reports these under `mmds`, without the prefix,
        // summed over the interfaces, with Firecracker's names).
        /// Guest frames for MMDS (never sent to the TAP).
        MmdsRxAccepted = "mmds_rx_accepted",
        /// Of those, frames MMDS could not use.
        MmdsRxAcceptedErr = "mmds_rx_accepted_err",
        /// Of those, IPv4 that was not TCP.
        MmdsRxAcceptedUnusual = "mmds_rx_accepted_unusual",
        /// Requests answered.
        MmdsRxCount = "mmds_rx_count",
        /// GETs without a session token.
        MmdsRxNoToken = "mmds_rx_no_token",
        /// GETs with a token that is not valid.
        MmdsRxInvalidToken = "mmds_rx_invalid_token",
        /// Responses sent.
        MmdsTxCount = "mmds_tx_count",
        /// Frames MMDS sent to the guest, and their bytes.
        MmdsTxFrames = "mmds_tx_frames",
        MmdsTxBytes = "mmds_tx_bytes",
        /// Frames MMDS could not deliver.
        MmdsTxErrors = "mmds_tx_errors",
        MmdsConnectionsCreated = "mmds_connections_created",
        MmdsConnectionsDestroyed = "mmds_connections_destroyed",
    }
}

counter_set! {
    /// A vhost-user-vsock backend's counters.
    VsockCounter {
        RxQueueEventCount = "rx_queue_event_count",
        TxQueueEventCount = "tx_queue_event_count",
        /// Payload bytes to the guest.
        RxBytesCount = "rx_bytes_count",
        /// Payload bytes from the guest.
        TxBytesCount = "tx_bytes_count",
        RxPacketsCount = "rx_packets_count",
        /// Packets taken from the guest's TX queue (dropped ones too).
        TxPacketsCount = "tx_packets_count",
        /// Connections a host client opened with `CONNECT`.
        HostConnsAdded = "host_conns_added",
        /// Connections the guest opened to a host listener.
        GuestConnsAdded = "guest_conns_added",
        /// Resets sent to the guest (a refused or broken connection).
        ConnsKilled = "conns_killed",
        /// Times a connection stopped reading its host socket for lack of
        /// guest credit.
        CreditStalls = "credit_stalls",
        /// Guest packets dropped (wrong CIDs, bad chains).
        DroppedPackets = "dropped_packets",
        /// Host clients dropped (bad or late `CONNECT`, too many).
        RefusedHostClients = "refused_host_clients",
        /// Queues the guest broke (no longer served).
        EventFails = "event_fails",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_fits_the_page_with_distinct_keys() {
        for keys in [BlockCounter::KEYS, NetCounter::KEYS, VsockCounter::KEYS] {
            assert!(keys.len() <= crate::SLOTS);
            let mut sorted = keys.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), keys.len());
        }
        assert_eq!(
            BlockCounter::RateLimiterEventCount.slot(),
            BlockCounter::KEYS.len() - 1
        );
        assert_eq!(
            NetCounter::KEYS[NetCounter::TxBytesCount.slot()],
            "tx_bytes_count"
        );
    }
}
