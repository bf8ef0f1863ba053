//! Making a message fit the server's limits: which payloads to offload beyond the threshold.
//!
//! Payloads that each stay under the offload threshold can still add up past what the server
//! accepts: its gRPC receive limit for the whole message, its workflow-task-completion limit,
//! its blob limit for the payloads of one field and its memo limit. For a namespace that
//! offloads, the encode stage offloads, after the codec and on top of what the threshold
//! chose, the largest payloads of each group over its limit, then of the message, until every
//! limit holds (a reference counts as [`REFERENCE_BYTES`]). Payloads no larger than a
//! reference are never chosen: offloading them saves nothing. A message that cannot fit even
//! then is forwarded as it is: the server's answer names its own limit, and the gateway's
//! figure for the gRPC limit may be lower than the server's.

use std::cmp::Reverse;

use payload_gateway_proto::{MessageType, Scan};

use crate::server_limits::Limits;

/// What one reference payload is counted as (its serialized size is a few hundred bytes,
/// growing with the object key: this bounds it with room to spare).
pub const REFERENCE_BYTES: usize = 4096;
/// Kept free below the message limit for what the estimate does not see: length prefixes of
/// enclosing messages growing, failures the gateway seals.
const MESSAGE_SLACK: usize = 16 * 1024;
/// Per payload, for its field's tag and length prefix.
const PER_PAYLOAD_SLACK: usize = 16;

const COMPLETION_REQUEST: &str =
    "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";

/// The limits one message's payloads must keep, by index in the encode batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FitPlan {
    /// Payload bytes the whole message may carry besides its other bytes.
    pub payload_budget: usize,
    /// Payloads a server limit counts together, with that limit (each `Payloads` with the
    /// blob limit, each memo with the memo limit).
    pub groups: Vec<(Vec<usize>, usize)>,
}

impl FitPlan {
    /// The plan for a message of type `ty` (`message`, walked as `scanned`) whose encode batch
    /// holds its sites and then `extra` payloads the gateway adds (sealed failures), within
    /// `limits`.
    pub fn new(
        ty: MessageType,
        message: &[u8],
        scanned: &Scan,
        extra: usize,
        limits: &Limits,
    ) -> Self {
        let sites = scanned.sites();
        let site_bytes: usize = sites.iter().map(|s| s.range().len()).sum();
        let mut limit = limits.message;
        if ty.name() == COMPLETION_REQUEST
            && let Some(completion) = limits.completion
        {
            limit = limit.min(completion);
        }
        let other = message.len().saturating_sub(site_bytes);
        let slack = MESSAGE_SLACK + PER_PAYLOAD_SLACK * (sites.len() + extra);
        let payload_budget = limit.saturating_sub(other + slack);
        // Group the sites by the message holding them (a `Payloads`, or a message with
        // singular payload fields) and memo entries by their memo.
        let mut groups: Vec<(Option<u32>, bool, Vec<usize>)> = Vec::new();
        for (i, site) in sites.iter().enumerate() {
            let memo = site.path().to_string().ends_with("memo.fields");
            let key = scanned.container(i, if memo { 2 } else { 1 });
            match groups.iter_mut().find(|(k, m, _)| *k == key && *m == memo) {
                Some((_, _, members)) => members.push(i),
                None => groups.push((key, memo, vec![i])),
            }
        }
        Self {
            payload_budget,
            groups: groups
                .into_iter()
                .map(|(_, memo, members)| (members, if memo { limits.memo } else { limits.blob }))
                .collect(),
        }
    }
}

/// The payloads to offload, ascending: every `eligible` one at or above `threshold`, then,
/// with a `plan`, the largest eligible ones of each group over its limit and of the message
/// over its budget. `sizes` are the encoded sizes of the batch.
pub fn choose(
    sizes: &[usize],
    eligible: &[bool],
    threshold: usize,
    plan: Option<&FitPlan>,
) -> Vec<usize> {
    let mut chosen: Vec<bool> = sizes
        .iter()
        .zip(eligible)
        .map(|(&s, &e)| e && s >= threshold)
        .collect();
    if let Some(plan) = plan {
        for (members, limit) in &plan.groups {
            shrink(sizes, eligible, &mut chosen, members, *limit);
        }
        let all: Vec<usize> = (0..sizes.len()).collect();
        shrink(sizes, eligible, &mut chosen, &all, plan.payload_budget);
    }
    (0..sizes.len()).filter(|&i| chosen[i]).collect()
}

/// Chooses the largest of `members` until their bytes fit `limit` (or nothing is left that
/// would help).
fn shrink(
    sizes: &[usize],
    eligible: &[bool],
    chosen: &mut [bool],
    members: &[usize],
    limit: usize,
) {
    let cost = |i: usize, chosen: &[bool]| {
        if chosen[i] {
            sizes[i].min(REFERENCE_BYTES)
        } else {
            sizes[i]
        }
    };
    let mut total: usize = members.iter().map(|&i| cost(i, chosen)).sum();
    if total <= limit {
        return;
    }
    let mut candidates: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| eligible[i] && !chosen[i] && sizes[i] > REFERENCE_BYTES)
        .collect();
    candidates.sort_by_key(|&i| Reverse(sizes[i]));
    for i in candidates {
        if total <= limit {
            break;
        }
        total = total - sizes[i] + REFERENCE_BYTES;
        chosen[i] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 1024;

    #[test]
    fn without_a_plan_the_threshold_alone_chooses() {
        let sizes = [100, 300 * K, 256 * K, 10 * K];
        let eligible = [true, true, false, true];
        assert_eq!(choose(&sizes, &eligible, 256 * K, None), vec![1]);
    }

    #[test]
    fn sixty_medium_payloads_are_offloaded_largest_first_until_the_message_fits() {
        // 60 payloads of 150 KB (one per command): 9 MB against a 4 MiB message.
        let mut sizes = vec![150_000; 60];
        sizes[7] = 160_000;
        let eligible = vec![true; 60];
        let plan = FitPlan {
            payload_budget: 4 * K * K - 64 * K,
            groups: (0..60).map(|i| (vec![i], 2 * K * K)).collect(),
        };
        let chosen = choose(&sizes, &eligible, 256 * K, Some(&plan));
        assert!(chosen.contains(&7), "the largest goes first");
        let kept: usize = (0..60)
            .map(|i| {
                if chosen.contains(&i) {
                    REFERENCE_BYTES
                } else {
                    sizes[i]
                }
            })
            .sum();
        assert!(kept <= plan.payload_budget, "{kept}");
        // No more than needed: one payload fewer would not fit.
        assert!(kept + 150_000 - REFERENCE_BYTES > plan.payload_budget);
    }

    #[test]
    fn a_group_over_its_limit_is_shrunk_even_when_the_message_fits() {
        // A memo of 9 entries of 255 KiB (under the threshold) against a 2 MiB memo limit.
        let sizes = vec![255 * K; 9];
        let eligible = vec![true; 9];
        let plan = FitPlan {
            payload_budget: 100 * K * K,
            groups: vec![((0..9).collect(), 2 * K * K)],
        };
        let chosen = choose(&sizes, &eligible, 256 * K, Some(&plan));
        assert_eq!(chosen.len(), 1);
    }

    #[test]
    fn ineligible_and_tiny_payloads_are_never_chosen() {
        let sizes = [3 * K * K, 100, 100];
        let eligible = [false, true, true];
        let plan = FitPlan {
            payload_budget: 10,
            groups: vec![],
        };
        assert!(choose(&sizes, &eligible, 256 * K, Some(&plan)).is_empty());
    }
}
