//! Which OCSF class and activity a CloudTrail event becomes: decided from `eventSource`,
//! `eventName`, `eventType` (and `readOnly`) alone, so routing by class needs no full parse.

/// The OCSF 1.1.0 classes trailhose maps CloudTrail to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// 3001: IAM user, group, role, access key, MFA and login-profile changes.
    AccountChange,
    /// 3002: console and IAM Identity Center sign-ins, STS sign-ins (assume-role, federation,
    /// session tokens).
    Authentication,
    /// 6003: every other API call, data events and Insights events.
    ApiActivity,
}

impl Class {
    pub const ALL: [Class; 3] = [
        Class::AccountChange,
        Class::Authentication,
        Class::ApiActivity,
    ];

    pub fn uid(self) -> u32 {
        match self {
            Class::AccountChange => 3001,
            Class::Authentication => 3002,
            Class::ApiActivity => 6003,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::AccountChange => "Account Change",
            Class::Authentication => "Authentication",
            Class::ApiActivity => "API Activity",
        }
    }

    /// The schema's own name (`api_activity`), as in Security Lake's source names.
    pub fn slug(self) -> &'static str {
        match self {
            Class::AccountChange => "account_change",
            Class::Authentication => "authentication",
            Class::ApiActivity => "api_activity",
        }
    }

    pub fn category_uid(self) -> u32 {
        self.uid() / 1000
    }

    pub fn category_name(self) -> &'static str {
        match self {
            Class::AccountChange | Class::Authentication => "Identity & Access Management",
            Class::ApiActivity => "Application Activity",
        }
    }
}

/// An activity: its id within the class and the schema's caption for it. `Other` (99) carries
/// the source's own name, as OCSF asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub id: u32,
    pub name: String,
}

impl Activity {
    fn of(id: u32, name: &str) -> Activity {
        Activity {
            id,
            name: name.to_owned(),
        }
    }
}

pub const OTHER: u32 = 99;
/// `eventType` of CloudTrail Insights events.
pub const INSIGHT: &str = "AwsCloudTrailInsight";

/// STS calls that issue credentials: a sign-in in OCSF's sense.
const STS_SIGN_INS: &[&str] = &[
    "AssumeRole",
    "AssumeRoleWithSAML",
    "AssumeRoleWithWebIdentity",
    "GetFederationToken",
    "GetSessionToken",
];

/// Console and IAM Identity Center sign-ins (no STS): `eventSource`, `eventName`.
const SIGN_INS: &[(&str, &str)] = &[
    ("signin.amazonaws.com", "ConsoleLogin"),
    ("signin.amazonaws.com", "CredentialChallenge"),
    ("signin.amazonaws.com", "CredentialVerification"),
    ("signin.amazonaws.com", "UserAuthentication"),
    ("signin.amazonaws.com", "ExternalIdPDirectoryLogin"),
    ("sso.amazonaws.com", "Authenticate"),
    ("sso.amazonaws.com", "Federate"),
    ("sso.amazonaws.com", "Logout"),
];

/// IAM calls that change an account and their Account Change activity (None: Other).
const IAM_CHANGES: &[(&str, Option<(u32, &str)>)] = &[
    ("CreateUser", Some((1, "Create"))),
    ("CreateRole", Some((1, "Create"))),
    ("CreateGroup", Some((1, "Create"))),
    ("CreateServiceLinkedRole", Some((1, "Create"))),
    ("DeleteUser", Some((6, "Delete"))),
    ("DeleteRole", Some((6, "Delete"))),
    ("DeleteGroup", Some((6, "Delete"))),
    ("DeleteServiceLinkedRole", Some((6, "Delete"))),
    ("ChangePassword", Some((3, "Password Change"))),
    ("CreateLoginProfile", Some((4, "Password Reset"))),
    ("UpdateLoginProfile", Some((4, "Password Reset"))),
    ("DeleteLoginProfile", Some((5, "Disable"))),
    ("AttachUserPolicy", Some((7, "Attach Policy"))),
    ("AttachRolePolicy", Some((7, "Attach Policy"))),
    ("AttachGroupPolicy", Some((7, "Attach Policy"))),
    ("PutUserPolicy", Some((7, "Attach Policy"))),
    ("PutRolePolicy", Some((7, "Attach Policy"))),
    ("PutGroupPolicy", Some((7, "Attach Policy"))),
    ("PutUserPermissionsBoundary", Some((7, "Attach Policy"))),
    ("PutRolePermissionsBoundary", Some((7, "Attach Policy"))),
    ("DetachUserPolicy", Some((8, "Detach Policy"))),
    ("DetachRolePolicy", Some((8, "Detach Policy"))),
    ("DetachGroupPolicy", Some((8, "Detach Policy"))),
    ("DeleteUserPolicy", Some((8, "Detach Policy"))),
    ("DeleteRolePolicy", Some((8, "Detach Policy"))),
    ("DeleteGroupPolicy", Some((8, "Detach Policy"))),
    ("DeleteUserPermissionsBoundary", Some((8, "Detach Policy"))),
    ("DeleteRolePermissionsBoundary", Some((8, "Detach Policy"))),
    ("EnableMFADevice", Some((10, "MFA Factor Enable"))),
    ("CreateVirtualMFADevice", Some((10, "MFA Factor Enable"))),
    ("DeactivateMFADevice", Some((11, "MFA Factor Disable"))),
    ("DeleteVirtualMFADevice", Some((11, "MFA Factor Disable"))),
    // Credentials and memberships have no activity of their own in 1.1.0.
    ("CreateAccessKey", None),
    ("DeleteAccessKey", None),
    ("UpdateAccessKey", None),
    ("AddUserToGroup", None),
    ("RemoveUserFromGroup", None),
    ("UpdateUser", None),
    ("UpdateRole", None),
    ("UpdateAssumeRolePolicy", None),
    ("UpdateGroup", None),
    ("ResyncMFADevice", None),
];

/// The class of an event, from its `eventSource`, `eventName` and `eventType`. Insights events
/// are API Activity whatever they name.
pub fn classify(
    event_source: Option<&str>,
    event_name: Option<&str>,
    event_type: Option<&str>,
) -> Class {
    if event_type == Some(INSIGHT) {
        return Class::ApiActivity;
    }
    match (event_source, event_name) {
        (Some(s), Some(n)) if SIGN_INS.contains(&(s, n)) => Class::Authentication,
        (Some("sts.amazonaws.com"), Some(n)) if STS_SIGN_INS.contains(&n) => Class::Authentication,
        (Some("iam.amazonaws.com"), Some(n)) if IAM_CHANGES.iter().any(|(c, _)| *c == n) => {
            Class::AccountChange
        }
        _ => Class::ApiActivity,
    }
}

/// The activity of a sign-in: Logoff for a sign-out, Other (named) for one step of an IAM
/// Identity Center sign-in (a credential asked for or checked), else Logon.
pub fn authentication_activity(event_name: &str) -> Activity {
    match event_name {
        "Logout" => Activity::of(2, "Logoff"),
        "CredentialChallenge" | "CredentialVerification" => Activity::of(OTHER, event_name),
        _ => Activity::of(1, "Logon"),
    }
}

/// The activity of an Account Change; `key_status` is `requestParameters.status` of
/// UpdateAccessKey (Active / Inactive).
pub fn account_change_activity(event_name: &str, key_status: Option<&str>) -> Activity {
    match (event_name, key_status) {
        ("UpdateAccessKey", Some("Active")) => return Activity::of(2, "Enable"),
        ("UpdateAccessKey", Some("Inactive")) => return Activity::of(5, "Disable"),
        _ => {}
    }
    match IAM_CHANGES.iter().find(|(c, _)| *c == event_name) {
        Some((_, Some((id, name)))) => Activity::of(*id, name),
        _ => Activity::of(OTHER, event_name),
    }
}

/// The activity of an API call, from the verb its name starts with; `readOnly` decides for
/// verbs not listed. Other carries the event's name.
pub fn api_activity(event_name: &str, read_only: Option<bool>) -> Activity {
    const CREATE: &[&str] = &[
        "Create", "Run", "Launch", "Allocate", "Import", "Register", "Issue", "Copy",
    ];
    const READ: &[&str] = &[
        "Get", "List", "Describe", "Head", "Lookup", "Search", "Select", "BatchGet", "Scan",
        "Query", "Check", "View", "Download", "Preview", "Estimate", "Decrypt", "Filter",
    ];
    const UPDATE: &[&str] = &[
        "Update",
        "Put",
        "Modify",
        "Set",
        "Attach",
        "Detach",
        "Associate",
        "Disassociate",
        "Enable",
        "Disable",
        "Change",
        "Tag",
        "Untag",
        "Add",
        "Replace",
        "Reset",
        "Start",
        "Stop",
        "Reboot",
        "Restore",
        "Upload",
        "Edit",
        "Apply",
        "Authorize",
        "Revoke",
        "Assign",
        "Unassign",
    ];
    const DELETE: &[&str] = &[
        "Delete",
        "Remove",
        "Terminate",
        "Deregister",
        "Release",
        "Purge",
        "Destroy",
    ];
    // A verb counts only at a word boundary: `Getaway` is not a Get.
    let starts = |verbs: &[&str]| {
        verbs.iter().any(|v| {
            event_name.strip_prefix(v).is_some_and(|rest| {
                rest.is_empty()
                    || rest.starts_with(|c: char| c.is_ascii_uppercase() || c.is_ascii_digit())
            })
        })
    };
    if starts(READ) {
        Activity::of(2, "Read")
    } else if starts(DELETE) {
        Activity::of(4, "Delete")
    } else if starts(CREATE) {
        Activity::of(1, "Create")
    } else if starts(UPDATE) {
        Activity::of(3, "Update")
    } else if read_only == Some(true) {
        Activity::of(2, "Read")
    } else {
        Activity::of(OTHER, event_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_ins_account_changes_and_everything_else() {
        let c = |s, n| classify(Some(s), Some(n), Some("AwsApiCall"));
        assert_eq!(
            c("signin.amazonaws.com", "ConsoleLogin"),
            Class::Authentication
        );
        assert_eq!(
            c("sts.amazonaws.com", "AssumeRoleWithSAML"),
            Class::Authentication
        );
        assert_eq!(
            c("sts.amazonaws.com", "GetCallerIdentity"),
            Class::ApiActivity
        );
        for n in [
            "UserAuthentication",
            "CredentialChallenge",
            "CredentialVerification",
        ] {
            assert_eq!(c("signin.amazonaws.com", n), Class::Authentication);
        }
        assert_eq!(c("sso.amazonaws.com", "Federate"), Class::Authentication);
        assert_eq!(c("sso.amazonaws.com", "ListAccounts"), Class::ApiActivity);
        assert_eq!(authentication_activity("Logout").id, 2);
        assert_eq!(authentication_activity("UserAuthentication").id, 1);
        assert_eq!(authentication_activity("CredentialChallenge").id, OTHER);
        assert_eq!(c("iam.amazonaws.com", "CreateUser"), Class::AccountChange);
        assert_eq!(
            c("iam.amazonaws.com", "CreateAccessKey"),
            Class::AccountChange
        );
        assert_eq!(c("iam.amazonaws.com", "ListUsers"), Class::ApiActivity);
        // A name alone, from another service, is not an IAM change.
        assert_eq!(c("s3.amazonaws.com", "CreateUser"), Class::ApiActivity);
        assert_eq!(classify(None, None, None), Class::ApiActivity);
        let insight = classify(
            Some("signin.amazonaws.com"),
            Some("ConsoleLogin"),
            Some(INSIGHT),
        );
        assert_eq!(insight, Class::ApiActivity);
        for class in Class::ALL {
            assert_eq!(class.category_uid(), class.uid() / 1000);
        }
    }

    #[test]
    fn account_change_activities() {
        assert_eq!(account_change_activity("CreateUser", None).id, 1);
        assert_eq!(account_change_activity("EnableMFADevice", None).id, 10);
        assert_eq!(
            account_change_activity("UpdateAccessKey", Some("Inactive")).id,
            5
        );
        assert_eq!(
            account_change_activity("UpdateAccessKey", Some("Active")).id,
            2
        );
        let other = account_change_activity("CreateAccessKey", None);
        assert_eq!((other.id, other.name.as_str()), (OTHER, "CreateAccessKey"));
    }

    #[test]
    fn api_activities_by_verb_then_read_only() {
        let a = |n, r| api_activity(n, r).id;
        assert_eq!(a("GetObject", None), 2);
        assert_eq!(a("RunInstances", Some(false)), 1);
        assert_eq!(a("PutObject", Some(false)), 3);
        assert_eq!(a("DeleteBucket", Some(false)), 4);
        assert_eq!(a("Getaway", Some(true)), 2);
        assert_eq!(a("Getaway", None), OTHER);
        assert_eq!(a("", None), OTHER);
        assert_eq!(api_activity("Frobnicate", Some(false)).name, "Frobnicate");
    }
}
