//! An accounts table from an AWS Organizations `list-accounts` export
//! (`aws organizations list-accounts --output json`): one CSV row per account.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum OrganizationsError {
    #[error("not an AWS Organizations list-accounts export: {0}")]
    Parse(String),
    #[error("account {index} has no Id")]
    NoId { index: usize },
    #[error("account {id} appears twice")]
    Repeated { id: String },
    #[error("cannot write the table: {0}")]
    Write(String),
}

#[derive(Deserialize)]
struct Export {
    #[serde(rename = "Accounts")]
    accounts: Vec<Account>,
}

#[derive(Deserialize)]
struct Account {
    #[serde(rename = "Id")]
    id: Option<String>,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Email", default)]
    email: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Arn", default)]
    arn: String,
    #[serde(rename = "JoinedTimestamp", default)]
    joined: Option<serde_json::Value>,
}

/// The columns written, in order; `account_id` is the key.
pub const COLUMNS: [&str; 6] = ["account_id", "name", "email", "status", "arn", "joined"];

/// CSV text (header row first) of the accounts in `export`, in its order.
pub fn accounts_csv(export: &[u8]) -> Result<Vec<u8>, OrganizationsError> {
    let export: Export =
        serde_json::from_slice(export).map_err(|e| OrganizationsError::Parse(e.to_string()))?;
    let mut out = csv::Writer::from_writer(Vec::new());
    let write = |e: csv::Error| OrganizationsError::Write(e.to_string());
    out.write_record(COLUMNS).map_err(write)?;
    let mut seen = std::collections::HashSet::new();
    for (index, a) in export.accounts.iter().enumerate() {
        let id =
            a.id.as_deref()
                .filter(|i| !i.is_empty())
                .ok_or(OrganizationsError::NoId { index })?;
        if !seen.insert(id) {
            return Err(OrganizationsError::Repeated { id: id.to_owned() });
        }
        // The CLI writes timestamps as ISO 8601 text; an SDK dump may use epoch seconds.
        let joined = match &a.joined {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        out.write_record([id, &a.name, &a.email, &a.status, &a.arn, &joined])
            .map_err(write)?;
    }
    out.into_inner()
        .map_err(|e| OrganizationsError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_become_rows_with_quoting_and_bad_exports_are_refused() {
        let export = br#"{"Accounts":[
            {"Id":"111122223333","Arn":"arn:aws:organizations::1:account/o-x/111122223333",
             "Email":"prod@example.com","Name":"Payments, prod","Status":"ACTIVE",
             "JoinedMethod":"CREATED","JoinedTimestamp":"2021-04-01T10:00:00.000000+00:00"},
            {"Id":"444455556666","Name":"sandbox","Status":"SUSPENDED"}]}"#;
        let csv = String::from_utf8(accounts_csv(export).unwrap()).unwrap();
        assert_eq!(
            csv,
            "account_id,name,email,status,arn,joined\n\
             111122223333,\"Payments, prod\",prod@example.com,ACTIVE,arn:aws:organizations::1:account/o-x/111122223333,2021-04-01T10:00:00.000000+00:00\n\
             444455556666,sandbox,,SUSPENDED,,\n"
        );
        assert!(matches!(
            accounts_csv(b"[]"),
            Err(OrganizationsError::Parse(_))
        ));
        assert!(matches!(
            accounts_csv(br#"{"Accounts":[{"Name":"x"}]}"#),
            Err(OrganizationsError::NoId { index: 0 })
        ));
        assert!(matches!(
            accounts_csv(br#"{"Accounts":[{"Id":"1"},{"Id":"1"}]}"#),
            Err(OrganizationsError::Repeated { .. })
        ));
    }
}
