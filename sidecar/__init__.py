"""supabase-aliyun-sms sidecar."""
