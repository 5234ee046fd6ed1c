-- The report-vs-image audit: images whose report states a CTR (КТИ 0,58; CTR 0.56), next to
-- the CTR measured on their masks. Rows where the two disagree by more than 0.05, or fall on
-- different sides of 0.5, come first: a wrong mask, a typo in the report, or a film whose
-- magnification differs (AP). Largest disagreement first.
SELECT uid, model, view, group_name, ROUND(CAST(report_ctr AS NUMERIC), 3) AS report_ctr, ROUND(CAST(ctr AS NUMERIC), 3) AS measured_ctr,
       ROUND(CAST(ctr - report_ctr AS NUMERIC), 3) AS difference,
       CASE WHEN (ctr > 0.5) <> (report_ctr > 0.5) THEN 'opposite sides of 0.5'
            WHEN ABS(ctr - report_ctr) > 0.05 THEN 'differ by more than 0.05'
            ELSE 'agree' END AS verdict,
       ROUND(CAST(quality AS NUMERIC), 3) AS quality
FROM label_results
WHERE report_ctr IS NOT NULL AND ctr IS NOT NULL
ORDER BY CASE WHEN (ctr > 0.5) <> (report_ctr > 0.5) OR ABS(ctr - report_ctr) > 0.05 THEN 0 ELSE 1 END,
         ABS(ctr - report_ctr) DESC;
