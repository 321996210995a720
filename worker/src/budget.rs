//! The worker's one budget for records in flight: source slices between their read and
//! the commit of their Kafka transaction, and write batches (the one being written and
//! the next, consumed meanwhile) until the destination committed them. A lane reserves
//! before it holds more; when the budget is spent it waits, and what it would have read
//! stays where it is — in the source, or in the records topic (a write lane that waits
//! stops consuming, its partition's pre-fetch window fills, and librdkafka stops
//! fetching it). Records fetched ahead of a write lane are bounded apart from this, by
//! the lane consumer's per-partition window (see [`prefetch_window_kib`]).
//!
//! Sizes are estimates: a record counts [`MEMORY_FACTOR`] times its encoded bytes —
//! its decoded form (JSON values), its encoded copy and librdkafka's copy, with the
//! allocator's slack. The factor was measured: with the budget unbound, 8 backfills
//! into a slow destination reserved 105 MB (at a factor of 3) and grew the worker's
//! resident memory by 400 MB (tests/tests/memory_budget.rs).

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::activity::ActivityError;

/// What a record in flight costs the worker, as a multiple of its encoded size.
pub const MEMORY_FACTOR: usize = 12;

/// What a record is taken to cost before one was seen (its encoded size guessed at
/// 200 bytes).
pub const FIRST_GUESS: usize = 200 * MEMORY_FACTOR;

/// The default budget (`--records-memory-mb`).
pub const DEFAULT_MB: u64 = 512;

#[derive(Debug)]
pub struct RecordsBudget {
    /// Whose budget: "read" or "write" lanes (the metrics' label).
    lanes: &'static str,
    permits: Semaphore,
    /// The budget in KiB (one permit each).
    total_kib: u32,
}

impl RecordsBudget {
    pub fn new(lanes: &'static str, bytes: u64) -> Self {
        let total_kib =
            (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize) as u64) as u32;
        let budget = Self {
            lanes,
            permits: Semaphore::new(total_kib as usize),
            total_kib,
        };
        crate::metrics::WORKER.records_budget(lanes, budget.capacity_bytes());
        budget
    }

    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    /// Bytes reserved right now.
    pub fn reserved_bytes(&self) -> u64 {
        (u64::from(self.total_kib) - self.permits.available_permits() as u64) * 1024
    }

    /// How many records of `per_record` bytes fit a quarter of the budget (at least
    /// one): the most a slice, or two write batches, hold.
    pub fn records_in_share(&self, per_record: usize) -> usize {
        (self.capacity_bytes() as usize / 4 / per_record.max(1)).max(1)
    }

    /// Whole KiB for `bytes`; a request larger than the whole budget takes all of it
    /// (it waits until everything else is returned, then runs alone).
    fn kib(&self, bytes: usize) -> u32 {
        (bytes.div_ceil(1024) as u64).clamp(1, u64::from(self.total_kib)) as u32
    }

    /// Waits for `bytes` of the budget; Cancelled if `cancel` fires first.
    pub async fn reserve(
        &self,
        bytes: usize,
        cancel: &CancellationToken,
    ) -> Result<Reservation<'_>, ActivityError> {
        let kib = self.kib(bytes);
        let permit = self.acquire(kib, cancel).await?;
        Ok(Reservation {
            budget: self,
            permit: Some(permit),
        })
    }

    async fn acquire(
        &self,
        kib: u32,
        cancel: &CancellationToken,
    ) -> Result<SemaphorePermit<'_>, ActivityError> {
        let permit = tokio::select! {
            p = self.permits.acquire_many(kib) => p.map_err(|_| ActivityError::Cancelled)?,
            _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
        };
        crate::metrics::WORKER.records_reserved(self.lanes, self.reserved_bytes());
        Ok(permit)
    }
}

/// A part of the budget, returned when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a RecordsBudget,
    permit: Option<SemaphorePermit<'a>>,
}

impl Reservation<'_> {
    /// Makes the reservation `bytes`. Shrinking returns the rest at once; growing gives
    /// everything back first and then waits in line for the whole amount (waiters are
    /// served in order, so two lanes that both grow never wait for each other).
    pub async fn resize(
        &mut self,
        bytes: usize,
        cancel: &CancellationToken,
    ) -> Result<(), ActivityError> {
        let kib = self.budget.kib(bytes);
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits() as u32);
        if kib == held {
            return Ok(());
        }
        if kib < held {
            if let Some(p) = self.permit.as_mut() {
                drop(p.split((held - kib) as usize));
            }
        } else {
            self.permit = None;
            self.permit = Some(self.budget.acquire(kib, cancel).await?);
        }
        crate::metrics::WORKER.records_reserved(self.budget.lanes, self.budget.reserved_bytes());
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.permit.take().is_some() {
            crate::metrics::WORKER
                .records_reserved(self.budget.lanes, self.budget.reserved_bytes());
        }
    }
}

/// The lane consumer's pre-fetch window per partition, in KiB: 2 MiB, or less under a
/// small budget (a 256th of it, at least 64 KiB).
pub fn prefetch_window_kib(budget_bytes: u64) -> u64 {
    (budget_bytes / 1024 / 256).clamp(64, 2048)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spent_budget_makes_the_next_reservation_wait_until_one_is_returned(
    ) -> Result<(), ActivityError> {
        let budget = RecordsBudget::new("test", 100 * 1024);
        let cancel = CancellationToken::new();
        let a = budget.reserve(60 * 1024, &cancel).await?;
        assert_eq!(budget.reserved_bytes(), 60 * 1024);
        let waiting = budget.reserve(50 * 1024, &cancel);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(a);
        let b = waiting.await?;
        assert_eq!(budget.reserved_bytes(), 50 * 1024);
        drop(b);
        assert_eq!(budget.reserved_bytes(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn resizing_shrinks_at_once_and_grows_without_holding_a_part() -> Result<(), ActivityError>
    {
        let budget = RecordsBudget::new("test", 100 * 1024);
        let cancel = CancellationToken::new();
        let mut a = budget.reserve(80 * 1024, &cancel).await?;
        a.resize(10 * 1024, &cancel).await?;
        assert_eq!(budget.reserved_bytes(), 10 * 1024);
        let b = budget.reserve(90 * 1024, &cancel).await?;
        // Growing while b holds the rest: a gives its 10 KiB back and waits (first in
        // line, so what is returned goes to it).
        let c = {
            let grow = a.resize(20 * 1024, &cancel);
            tokio::pin!(grow);
            assert!(futures::poll!(&mut grow).is_pending());
            let c = budget.reserve(1024, &cancel);
            tokio::pin!(c);
            assert!(futures::poll!(&mut c).is_pending());
            drop(b);
            grow.await?;
            c.await?
        };
        assert_eq!(budget.reserved_bytes(), 21 * 1024);
        drop((a, c));
        assert_eq!(budget.reserved_bytes(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_takes_all_of_it_and_a_cancel_ends_a_wait(
    ) -> Result<(), ActivityError> {
        let budget = RecordsBudget::new("test", 64 * 1024);
        let cancel = CancellationToken::new();
        let all = budget.reserve(10 << 20, &cancel).await?;
        assert_eq!(budget.reserved_bytes(), budget.capacity_bytes());
        let waiting = budget.reserve(1, &cancel);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        cancel.cancel();
        assert!(matches!(waiting.await, Err(ActivityError::Cancelled)));
        drop(all);
        assert_eq!(budget.reserved_bytes(), 0);
        Ok(())
    }

    #[test]
    fn the_prefetch_window_shrinks_with_the_budget() {
        assert_eq!(prefetch_window_kib(256 << 20), 1024);
        assert_eq!(prefetch_window_kib(1 << 30), 2048);
        assert_eq!(prefetch_window_kib(4 << 20), 64);
    }
}
