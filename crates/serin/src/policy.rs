//! What a Canary author may make the operator do with the operator's own identity.
//!
//! Anyone who can write a Canary in any watched namespace could otherwise point Serin's AWS
//! credentials at another role or endpoint, or make Serin send requests (with the headers
//! and Secret-backed credentials the Canary names) to any URL. These are operator-level
//! settings: `serin run` flags (the chart's values), and a Canary may only choose among
//! them. A refused Canary is Invalid, with a message that names the field and the setting
//! that would allow it.
//!
//! - AWS role ARNs (`roleArn` of `router.appMeshApi` and `provider.cloudWatch`): none is
//!   allowed unless listed with `--allow-aws-role-arn` (chart `aws.allowedRoleArns`).
//! - AWS endpoint overrides (`endpoint` of the same): none unless listed with
//!   `--allow-aws-endpoint` (chart `aws.allowedEndpoints`).
//! - URLs Serin fetches for a Canary (`provider.prometheus.address`): any, unless
//!   `--allow-address` patterns are given (chart `allowedAddresses`). Allowing every address
//!   is the default for compatibility and is a risk: a Canary author can make Serin send
//!   requests from inside the cluster to any address it can reach.
//!
//! Patterns are matched against the whole value; `*` matches any run of characters (also
//! none), everything else literally.

use crate::api::{CanarySpec, Problem};

/// A `*` glob, matched against a whole string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern as written.
    pub fn new(p: impl Into<String>) -> Self {
        Pattern(p.into())
    }

    /// Whether `value` matches, whole.
    pub fn matches(&self, value: &str) -> bool {
        let parts: Vec<&str> = self.0.split('*').collect();
        if parts.len() == 1 {
            return self.0 == value;
        }
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if !value.starts_with(first)
            || !value.ends_with(last)
            || value.len() < first.len() + last.len()
        {
            return false;
        }
        // Both ends are char boundaries: `first` and `last` match there.
        let mut rest = &value[first.len()..value.len() - last.len()];
        for middle in &parts[1..parts.len() - 1] {
            match rest.find(middle) {
                Some(i) => rest = &rest[i + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The operator's allow-lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Role ARNs a Canary may ask Serin to assume.
    pub role_arns: Vec<Pattern>,
    /// AWS endpoint overrides a Canary may use.
    pub aws_endpoints: Vec<Pattern>,
    /// Addresses Serin fetches for a Canary; `None` allows every address.
    pub addresses: Option<Vec<Pattern>>,
    /// Whether Serin may read Secrets (a Prometheus `secretRef`, and the Secrets a target's
    /// pod template reads, whose data is part of its revision). Without it Serin neither
    /// reads nor watches any Secret.
    pub read_secrets: bool,
}

impl Policy {
    /// Whether Serin may fetch `url` for a Canary (a Prometheus address, a webhook URL).
    pub fn may_fetch(&self, url: &str) -> bool {
        self.addresses
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|r| r.matches(url)))
    }
}

impl Default for Policy {
    /// No role ARN, no endpoint override, every address.
    fn default() -> Self {
        Policy {
            role_arns: Vec::new(),
            aws_endpoints: Vec::new(),
            addresses: None,
            read_secrets: true,
        }
    }
}

/// `serin run`'s flags for the [`Policy`].
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// A role ARN pattern (`*` wildcards) Canaries may set as `roleArn` for Serin to assume;
    /// repeatable. None by default: a Canary with a roleArn is Invalid.
    #[arg(long = "allow-aws-role-arn", value_name = "PATTERN")]
    pub allow_aws_role_arn: Vec<String>,
    /// An AWS endpoint URL pattern Canaries may set as `endpoint`; repeatable. None by
    /// default.
    #[arg(long = "allow-aws-endpoint", value_name = "PATTERN")]
    pub allow_aws_endpoint: Vec<String>,
    /// A URL pattern Serin may fetch for a Canary (`provider.prometheus.address`);
    /// repeatable. Without it every address is allowed (a risk: see docs/security.md).
    #[arg(long = "allow-address", value_name = "PATTERN")]
    pub allow_address: Vec<String>,
    /// Read no Secrets (chart value readSecrets: false, which grants none): no Secret is
    /// watched or read, a Canary whose Prometheus provider has a secretRef is Invalid, and
    /// a change of a Secret a target's pods read does not start a rollout by itself.
    #[arg(long = "no-read-secrets")]
    pub no_read_secrets: bool,
}

impl PolicyArgs {
    /// The policy these flags describe.
    pub fn policy(&self) -> Policy {
        let patterns = |v: &[String]| v.iter().map(Pattern::new).collect::<Vec<_>>();
        Policy {
            role_arns: patterns(&self.allow_aws_role_arn),
            aws_endpoints: patterns(&self.allow_aws_endpoint),
            addresses: (!self.allow_address.is_empty()).then(|| patterns(&self.allow_address)),
            read_secrets: !self.no_read_secrets,
        }
    }
}

impl Policy {
    /// Every address, role and endpoint allowed: for the demo and tests that are not about
    /// the policy.
    pub fn allow_all() -> Self {
        Policy {
            role_arns: vec![Pattern::new("*")],
            aws_endpoints: vec![Pattern::new("*")],
            addresses: None,
            read_secrets: true,
        }
    }

    /// What in `spec` this policy refuses; empty when everything is allowed.
    pub fn check(&self, spec: &CanarySpec) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut aws = |field: String, conn: &crate::api::AwsConnection| {
            if let Some(arn) = &conn.role_arn
                && !self.role_arns.iter().any(|r| r.matches(arn))
            {
                p.push(Problem::new(
                    format!("{field}.roleArn"),
                    format!("{arn:?} is not a role this operator may assume"),
                    "remove roleArn (Serin then uses its own AWS identity), or have the operator's administrator allow it: serin run --allow-aws-role-arn PATTERN (chart value aws.allowedRoleArns)",
                ));
            }
            if let Some(endpoint) = &conn.endpoint
                && !self.aws_endpoints.iter().any(|r| r.matches(endpoint))
            {
                p.push(Problem::new(
                    format!("{field}.endpoint"),
                    format!("{endpoint:?} is not an AWS endpoint this operator may use"),
                    "remove endpoint (Serin then uses the region's), or have the operator's administrator allow it: serin run --allow-aws-endpoint PATTERN (chart value aws.allowedEndpoints)",
                ));
            }
        };
        if let Some(api) = &spec.router.app_mesh_api {
            aws("spec.router.appMeshApi".into(), &api.aws);
        }
        for (i, m) in spec.analysis.metrics.iter().enumerate() {
            if let Some(cw) = &m.provider.cloud_watch {
                aws(
                    format!("spec.analysis.metrics[{i}].provider.cloudWatch"),
                    cw,
                );
            }
        }
        if !self.read_secrets {
            for (i, m) in spec.analysis.metrics.iter().enumerate() {
                if m.provider
                    .prometheus
                    .as_ref()
                    .is_some_and(|p| p.secret_ref.is_some())
                {
                    p.push(Problem::new(
                        format!("spec.analysis.metrics[{i}].provider.prometheus.secretRef"),
                        "this operator reads no Secrets (serin run --no-read-secrets, chart value readSecrets: false)",
                        "remove secretRef (send credentials another way, for example headers), or have the operator's administrator set readSecrets: true",
                    ));
                }
            }
        }
        if !self.read_secrets {
            for (i, w) in spec.webhooks.iter().enumerate() {
                if w.secret_ref.is_some() {
                    p.push(Problem::new(
                        format!("spec.webhooks[{i}].secretRef"),
                        "this operator reads no Secrets (serin run --no-read-secrets, chart value readSecrets: false)",
                        "write the URL in url and the headers in headers, or have the operator's administrator set readSecrets: true",
                    ));
                }
            }
        }
        if let Some(allowed) = &self.addresses {
            for (i, w) in spec.webhooks.iter().enumerate() {
                if let Some(url) = &w.url
                    && !self.may_fetch(url)
                {
                    p.push(Problem::new(
                        format!("spec.webhooks[{i}].url"),
                        format!("{url:?} is not an address this operator may call"),
                        format!(
                            "use an allowed address ({}), or have the operator's administrator allow it: serin run --allow-address PATTERN (chart value allowedAddresses)",
                            allowed
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            for (i, m) in spec.analysis.metrics.iter().enumerate() {
                if let Some(prom) = &m.provider.prometheus
                    && !allowed.iter().any(|r| r.matches(&prom.address))
                {
                    p.push(Problem::new(
                        format!("spec.analysis.metrics[{i}].provider.prometheus.address"),
                        format!("{:?} is not an address this operator may fetch", prom.address),
                        format!(
                            "use an allowed address ({}), or have the operator's administrator allow it: serin run --allow-address PATTERN (chart value allowedAddresses)",
                            allowed
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_values() {
        let p = Pattern::new("arn:aws:iam::123456789012:role/serin-*");
        assert!(p.matches("arn:aws:iam::123456789012:role/serin-metrics"));
        assert!(p.matches("arn:aws:iam::123456789012:role/serin-"));
        assert!(!p.matches("arn:aws:iam::999999999999:role/serin-metrics"));
        assert!(!p.matches("xarn:aws:iam::123456789012:role/serin-metrics"));
        let p = Pattern::new("http://*.monitoring.svc:9090");
        assert!(p.matches("http://prometheus.monitoring.svc:9090"));
        assert!(!p.matches("http://prometheus.monitoring.svc:9090.evil.example"));
        assert!(!p.matches("http://evil.example/x.monitoring.svc:9090x"));
        assert!(Pattern::new("*").matches(""));
        assert!(Pattern::new("a*b*c").matches("abc"));
        assert!(Pattern::new("a*b*c").matches("aXbYc"));
        assert!(!Pattern::new("a*b*c").matches("acb"));
        assert!(!Pattern::new("ab*ba").matches("aba"));
        assert!(Pattern::new("exact").matches("exact"));
        assert!(!Pattern::new("é*é").matches("é"));
        assert!(Pattern::new("é*é").matches("éé"));
        assert!(!Pattern::new("exact").matches("exactly"));
    }

    fn spec(yaml: &str) -> CanarySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    const AWS: &str = r#"
backends: {primary: a, canary: b}
service: {port: 80}
router: {appMeshApi: {mesh: m, virtualRouter: vr, route: r, region: us-west-2, roleArn: "arn:aws:iam::1:role/other", endpoint: "http://evil.example"}}
analysis:
  metrics:
    - name: errors
      provider: {cloudWatch: {region: us-west-2, roleArn: "arn:aws:iam::1:role/serin-cw"}}
      preset: cloudwatch-appmesh-error-rate
      max: 1
    - name: prom
      provider: {prometheus: {address: "http://169.254.169.254/latest"}}
      query: up
      max: 1
"#;

    /// By default no role and no endpoint override is allowed, every address is.
    #[test]
    fn the_default_refuses_roles_and_endpoints_naming_field_and_setting() {
        let problems = Policy::default().check(&spec(AWS));
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.router.appMeshApi.roleArn",
                "spec.router.appMeshApi.endpoint",
                "spec.analysis.metrics[0].provider.cloudWatch.roleArn",
            ]
        );
        assert!(
            problems[0].to_string().contains("--allow-aws-role-arn")
                && problems[0].to_string().contains("aws.allowedRoleArns"),
            "{}",
            problems[0]
        );
        assert!(problems[1].to_string().contains("aws.allowedEndpoints"));
    }

    /// Webhook URLs obey the address allow-list, and an operator that reads no Secrets
    /// refuses a webhook's secretRef.
    #[test]
    fn webhooks_obey_the_allow_list_and_the_secrets_setting() {
        let hooks = spec(
            r#"
backends: {primary: a, canary: b}
service: {port: 80}
router: {gatewayApi: {httpRoute: {name: r}}}
analysis:
  metrics:
    - name: plain
      provider: {prometheus: {address: "http://prometheus.monitoring:9090"}}
      preset: gateway-error-rate
      max: 1
webhooks:
  - {name: inside, type: rollout, url: "http://loadtester.test/run"}
  - {name: outside, type: rollout, url: "http://169.254.169.254/latest/meta-data"}
  - {name: secret, type: post-rollout, secretRef: {name: hook}}
"#,
        );
        let args = PolicyArgs {
            allow_address: vec![
                "http://prometheus.monitoring:9090".into(),
                "http://loadtester.test/*".into(),
            ],
            no_read_secrets: true,
            ..Default::default()
        };
        let policy = args.policy();
        let problems = policy.check(&hooks);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.webhooks[2].secretRef", "spec.webhooks[1].url"],
            "{problems:?}"
        );
        assert!(problems[1].to_string().contains("--allow-address"));
        assert!(policy.may_fetch("http://loadtester.test/run"));
        assert!(!policy.may_fetch("http://loadtester.test.evil/run"));
        assert!(Policy::default().may_fetch("http://anything/"));
    }

    /// An operator that reads no Secrets refuses a Prometheus secretRef, naming the field,
    /// the setting and the fix; one that reads them does not.
    #[test]
    fn no_read_secrets_refuses_a_secret_ref() {
        let with_ref = spec(
            r#"
backends: {primary: a, canary: b}
service: {port: 80}
router: {gatewayApi: {httpRoute: {name: r}}}
analysis:
  metrics:
    - name: plain
      provider: {prometheus: {address: "http://prometheus:9090"}}
      preset: gateway-error-rate
      max: 1
    - name: tenant
      provider: {prometheus: {address: "http://mimir:8080", secretRef: {name: mimir-token}}}
      preset: gateway-error-rate
      max: 1
"#,
        );
        let args = PolicyArgs {
            no_read_secrets: true,
            ..Default::default()
        };
        let problems = args.policy().check(&with_ref);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].field,
            "spec.analysis.metrics[1].provider.prometheus.secretRef"
        );
        let text = problems[0].to_string();
        assert!(
            text.contains("readSecrets: false") && text.contains("remove secretRef"),
            "{text}"
        );
        assert!(Policy::default().check(&with_ref).is_empty());
    }

    /// Allowed patterns let exactly what they match through.
    #[test]
    fn allowed_patterns_admit_only_what_they_match() {
        let policy = PolicyArgs {
            allow_aws_role_arn: vec!["arn:aws:iam::1:role/serin-*".into()],
            allow_aws_endpoint: vec![],
            allow_address: vec!["http://prometheus.*:9090".into()],
            no_read_secrets: false,
        }
        .policy();
        let problems = policy.check(&spec(AWS));
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.router.appMeshApi.roleArn",
                "spec.router.appMeshApi.endpoint",
                "spec.analysis.metrics[1].provider.prometheus.address",
            ]
        );
        assert!(
            problems[2].to_string().contains("http://prometheus.*:9090"),
            "{}",
            problems[2]
        );
        assert!(Policy::allow_all().check(&spec(AWS)).is_empty());
    }
}
