//! CloudTrail's own top-level field names. The splitter flags an event with any other top-level
//! member (`Head::other_members`), so that the enrichment stages know, without a second parse,
//! that the event may already hold a member they are about to add (`geo`, a lookup's field).

/// Every top-level field CloudTrail writes (management, data, network activity and Insights
/// events). A lookup may not add one of these (`config::enrich`): an event would carry it twice.
pub const CLOUDTRAIL_FIELDS: &[&str] = &[
    "eventVersion",
    "userIdentity",
    "eventTime",
    "eventSource",
    "eventName",
    "awsRegion",
    "sourceIPAddress",
    "userAgent",
    "errorCode",
    "errorMessage",
    "requestParameters",
    "responseElements",
    "additionalEventData",
    "requestID",
    "eventID",
    "eventType",
    "apiVersion",
    "managementEvent",
    "readOnly",
    "resources",
    "recipientAccountId",
    "serviceEventDetails",
    "sharedEventID",
    "vpcEndpointId",
    "vpcEndpointAccountId",
    "eventCategory",
    "addendum",
    "sessionCredentialFromConsole",
    "edgeDeviceDetails",
    "tlsDetails",
    "insightDetails",
];

/// The names of [`CLOUDTRAIL_FIELDS`] with `len` bytes, most frequent first. Dispatching on
/// the length keeps the per-key check on the splitter's hot path to a jump and a compare or two.
fn by_length(len: usize) -> &'static [&'static str] {
    match len {
        7 => &["eventID"],
        8 => &["readOnly", "addendum"],
        9 => &[
            "userAgent",
            "requestID",
            "resources",
            "eventTime",
            "eventName",
            "awsRegion",
            "eventType",
            "errorCode",
        ],
        10 => &["tlsDetails", "apiVersion"],
        11 => &["eventSource"],
        12 => &["eventVersion", "userIdentity", "errorMessage"],
        13 => &["eventCategory", "sharedEventID", "vpcEndpointId"],
        14 => &["insightDetails"],
        15 => &["managementEvent", "sourceIPAddress"],
        16 => &["responseElements"],
        17 => &["requestParameters", "edgeDeviceDetails"],
        18 => &["recipientAccountId"],
        19 => &["additionalEventData", "serviceEventDetails"],
        20 => &["vpcEndpointAccountId"],
        28 => &["sessionCredentialFromConsole"],
        _ => &[],
    }
}

/// True when `key` is one of CloudTrail's own top-level fields.
#[inline]
pub fn is_cloudtrail_field(key: &str) -> bool {
    by_length(key.len()).contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_buckets_hold_exactly_the_listed_fields() {
        for f in CLOUDTRAIL_FIELDS {
            assert!(is_cloudtrail_field(f), "{f}");
        }
        for n in 0..64 {
            assert!(by_length(n).iter().all(|f| f.len() == n), "{n}");
        }
        let bucketed: usize = (0..64).map(|n| by_length(n).len()).sum();
        assert_eq!(bucketed, CLOUDTRAIL_FIELDS.len());
        for other in [
            "geo",
            "account",
            "eventid",
            "EventID",
            "",
            "trailhoseArrivalTime",
        ] {
            assert!(!is_cloudtrail_field(other), "{other}");
        }
    }
}
